"""The native CUDA kernels (csrc/cuda) against the reference backend.

Every GPU test is marked ``cuda`` (skipped with that reason where no GPU is visible) and FAILS,
rather than skips, when a GPU is visible but fastlars._C has no CUDA kernels: on a GPU machine a
missing CUDA build is a bug of the install, not a reason to test less. The host logic that needs
no GPU (the chunk planner the kernels walk) is tested here too, on every machine.

Covered on the GPU: every LARS/LAMB option over harness.SHAPES for 30 steps with a changing lr;
fp32, bf16 and fp16 params with and without fp32 master weights; more tensors than one launch
holds (empty ones among them, last included); a tensor of more than 2^31 elements when the GPU has
the memory; bit-identical norms across runs; GradScaler unscale and found_inf skip; CUDA-graph
capture with capturable=True and a tensor lr; torch.compile(fullgraph=True); a state_dict saved
on the GPU loaded on the CPU and continued there.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastlars
from fastlars import backends, functional
from harness import (
    SHAPES,
    assert_same_trajectory,
    lr_at,
    make_params,
    run_trajectory,
    synthetic_grads,
)

ROOT = Path(__file__).resolve().parent.parent

LARS_OPTIONS = [
    {"weight_decay": 1e-2},
    {"weight_decay": 1e-2, "momentum_style": "torch"},
    {"weight_decay": 1e-2, "nesterov": True},
    {"weight_decay": 1e-2, "nesterov": True, "momentum_style": "torch"},
    {"weight_decay": 1e-2, "trust_clip": True},
    {"weight_decay": 1e-2, "trust_ratio_bounds": (0.01, 10.0), "eps": 1e-8},
    {"weight_decay": 0.0},  # adapt defaults to False: the single-pass path
    {"weight_decay": 0.0, "adapt": True, "maximize": True},
]
LAMB_OPTIONS = [
    {},
    {"bias_correction": False},
    {"grad_averaging": False},
    {"decoupled_decay": True},
    {"trust_clip": True, "trust_ratio_bounds": (0.01, 10.0)},
    {"max_grad_norm": 1.0},
    {"weight_decay": 0.0},  # adapt defaults to False: the single-pass path
    {"weight_decay": 0.0, "adapt": True, "maximize": True},
]
ALGOS = [(fastlars.LARS, 1.0), (fastlars.LAMB, 0.01)]
# (param dtype, master_weights)
STORAGE = [
    (torch.float32, False),
    (torch.bfloat16, True),
    (torch.float16, True),
    (torch.bfloat16, False),
    (torch.float16, False),
]


@pytest.fixture
def native_cuda() -> None:
    """Fail (not skip) when a GPU is visible but the native backend has no CUDA kernels."""
    reason = backends.unavailable_reason("native", torch.device("cuda"))
    assert reason is None, f"native backend unusable on CUDA: {reason} (build with FASTLARS_CUDA=1)"


def _trajectory(cls, options, backend, dtype=torch.float32, master=False, shapes=SHAPES, base_lr=1.0, **kw):
    def make(params):
        return cls(params, lr=base_lr, backend=backend, master_weights=master, **options)

    return run_trajectory(make, shapes=shapes, dtype=dtype, steps=30, base_lr=base_lr, device="cuda", **kw)


# ----------------------------------------------------------------------------- host logic
def test_chunk_planner_host_logic(tmp_path: Path) -> None:
    """chunk_plan.h: every element visited once with empty tensors anywhere, > 1 table, > 2^31 elements."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH to build csrc/cuda/test/chunk_plan_test.cpp")
    exe = tmp_path / "chunk_plan_test"
    src = ROOT / "csrc" / "cuda" / "test" / "chunk_plan_test.cpp"
    subprocess.run([compiler, "-std=c++17", "-O1", "-I", str(ROOT / "csrc" / "cuda"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- trajectories
@pytest.mark.cuda
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=str)
def test_lars_options_match_reference(native_cuda, options) -> None:
    ref = _trajectory(fastlars.LARS, options, "reference")
    nat = _trajectory(fastlars.LARS, options, "native")
    assert_same_trajectory(ref, nat, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=str)
def test_lamb_options_match_reference(native_cuda, options) -> None:
    ref = _trajectory(fastlars.LAMB, options, "reference", base_lr=0.01)
    nat = _trajectory(fastlars.LAMB, options, "native", base_lr=0.01)
    assert_same_trajectory(ref, nat, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,master", STORAGE, ids=str)
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_dtypes_and_master_weights_match_reference(native_cuda, cls, base_lr, dtype, master) -> None:
    options = {"weight_decay": 1e-2}
    ref = _trajectory(cls, options, "reference", dtype=dtype, master=master, base_lr=base_lr)
    nat = _trajectory(cls, options, "native", dtype=dtype, master=master, base_lr=base_lr)
    assert_same_trajectory(ref, nat, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_mixed_dtypes_in_one_group(native_cuda, cls, base_lr) -> None:
    """One group holding fp32 and bf16 params with master weights: two dtype buckets in one call."""

    def run(backend):
        params = make_params([(33, 17), (1031,), (0,), (5, 5)], torch.float32, "cuda")
        params[1] = params[1].detach().to(torch.bfloat16).requires_grad_(True)
        opt = cls(params, lr=base_lr, weight_decay=1e-2, master_weights=True, backend=backend)
        for t in range(1, 31):
            opt.param_groups[0]["lr"] = lr_at(t, base_lr)
            for p, g in zip(params, synthetic_grads(params, t)):
                p.grad = g
            opt.step()
        return params, opt

    ref, nat = run("reference"), run("native")
    assert_same_trajectory(ref, nat, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_more_tensors_than_one_launch_holds(native_cuda, cls, base_lr) -> None:
    """1500 tensors (a table holds about 540), empty ones scattered and last: several launches per wave."""
    shapes = [(0,) if i % 97 == 0 else (1 + (i * 37) % 300,) for i in range(1500)] + [(0,)]
    ref = _trajectory(cls, {"weight_decay": 1e-2}, "reference", shapes=shapes, base_lr=base_lr)
    nat = _trajectory(cls, {"weight_decay": 1e-2}, "native", shapes=shapes, base_lr=base_lr)
    assert_same_trajectory(ref, nat, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("wave_bytes", ["1", "4096"])
def test_small_waves_match_reference(native_cuda, monkeypatch, wave_bytes) -> None:
    """FASTLARS_CUDA_WAVE_BYTES splits a call into many waves (read once per device: a subprocess)."""
    code = (
        "import torch, fastlars, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from harness import run_trajectory, assert_same_trajectory\n"
        "for cls, lr in ((fastlars.LARS, 1.0), (fastlars.LAMB, 0.01)):\n"
        "    runs = [run_trajectory(lambda p, b=b: cls(p, lr=lr, weight_decay=1e-2, backend=b),\n"
        "                           base_lr=lr, device='cuda') for b in ('reference', 'native')]\n"
        "    assert_same_trajectory(*runs, torch.float32)\n"
    )
    monkeypatch.setenv("FASTLARS_CUDA_WAVE_BYTES", wave_bytes)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------- norms
@pytest.mark.cuda
def test_grad_norms_are_deterministic_and_accurate(native_cuda) -> None:
    impl = backends.load("native")
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=gen) for n in (0, 1, 7, 16_384, 16_385, 3_000_001)]
    grads.append(torch.randn(4099, device="cuda", generator=gen).to(torch.bfloat16))
    scale = torch.tensor(1024.0, device="cuda")
    first = impl.grad_norms(grads, scale)
    for _ in range(5):
        assert torch.equal(impl.grad_norms(grads, scale), first)
    expected = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).float() / 1024.0
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=0.0)
    assert first[0].item() == 0.0


@pytest.mark.cuda
def test_tensor_beyond_2_pow_31_elements(native_cuda) -> None:
    """int64 indexing: norms and a LARS step over a tensor of 2^31 + 4099 elements (needs ~30 GB)."""
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 3.5 * 4 * n:
        pytest.skip(f"needs {3.5 * 4 * n / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    g = torch.ones(n, device="cuda")
    g[-4099:] = 2.0  # past element 2^31: contributes 3·4099 more to Σg²
    norm = backends.load("native").grad_norms([g], None)
    assert norm.item() == pytest.approx((n + 3 * 4099) ** 0.5, rel=1e-6)

    w = torch.ones(n, device="cuda")
    v = torch.zeros(n, device="cuda")
    functional.lars_step([w], [g], [v], lr=0.5, momentum=0.9, weight_decay=0.0, adapt=True, backend="native")
    ratio = 0.001 * n**0.5 / (n + 3 * 4099) ** 0.5
    assert w[0].item() == pytest.approx(1.0 - 0.5 * ratio, rel=1e-6)
    assert w[-1].item() == pytest.approx(1.0 - 0.5 * ratio * 2.0, rel=1e-6)
    assert v[2**31 + 17].item() == pytest.approx(0.5 * ratio * 2.0, rel=1e-6)
    del g, v
    w.sub_(w[0].item())
    assert int(torch.count_nonzero(w[: n - 4099])) == 0, "every element before the tail got the same update"


# -------------------------------------------------------------------- AMP and skipping
@pytest.mark.cuda
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_nonfinite_gradient_skips_the_whole_step(native_cuda, cls, base_lr) -> None:
    def hook(step, grads):
        if step in (4, 9):
            grads[5].view(-1)[3] = float("nan") if step == 4 else float("inf")

    ref = _trajectory(cls, {"weight_decay": 1e-2}, "reference", base_lr=base_lr, grad_hook=hook)
    nat = _trajectory(cls, {"weight_decay": 1e-2}, "native", base_lr=base_lr, grad_hook=hook)
    assert_same_trajectory(ref, nat, torch.float32)
    assert nat[1].skipped_steps == 2
    assert all(nat[1].state[p]["step"].item() == 28 for p in nat[0] if p.numel() > 0)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,lr", ALGOS, ids=["lars", "lamb"])
def test_grad_scaler_unscales_in_kernel_and_skips_overflow(native_cuda, cls, lr) -> None:
    """torch.amp.GradScaler hands grad_scale/found_inf to step(); both backends follow the same path."""

    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
        opt = cls(fastlars.param_groups(model, 1e-2), lr=lr, backend=backend)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
        gen = torch.Generator().manual_seed(1)
        for t in range(12):
            x = torch.randn(64, 16, generator=gen).cuda()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean() * (1e6 if t == 5 else 1.0)  # t = 5 overflows fp16
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return list(model.parameters()), opt

    ref, nat = run("reference"), run("native")
    assert_same_trajectory(ref, nat, torch.float16)


# ------------------------------------------------------------------- graphs and compile
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
@pytest.mark.parametrize("cls,kw,base_lr", [(fastlars.LARS, {"weight_decay": 1e-2, "trust_clip": True}, 1.0),
                                            (fastlars.LAMB, {"max_grad_norm": 1.0}, 0.01)], ids=["lars", "lamb"])
def test_cuda_graph_capture_with_tensor_lr(native_cuda, cls, kw, base_lr, dtype, master) -> None:
    eager_params = make_params(SHAPES, dtype, "cuda")
    eager = cls(eager_params, lr=torch.tensor(base_lr, device="cuda"), capturable=True, backend="native",
                master_weights=master, **kw)
    params = make_params(SHAPES, dtype, "cuda")
    lr = torch.tensor(base_lr, device="cuda")
    opt = cls(params, lr=lr, capturable=True, backend="native", master_weights=master, **kw)
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g, new in zip(grads, synthetic_grads(params, 1)):
            g.copy_(new)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for p, new in zip(eager_params, synthetic_grads(eager_params, 1)):
        p.grad = new
    eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for t in range(2, 31):
        lr.fill_(lr_at(t, base_lr))
        eager.param_groups[0]["lr"].fill_(lr_at(t, base_lr))
        for g, new in zip(grads, synthetic_grads(params, t)):
            g.copy_(new)
        graph.replay()
        for p, new in zip(eager_params, synthetic_grads(eager_params, t)):
            p.grad = new
        eager.step()
    torch.cuda.synchronize()
    assert_same_trajectory((eager_params, eager), (params, opt), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_compiled_step_fullgraph(native_cuda, cls, base_lr) -> None:
    torch._dynamo.reset()
    eager = make_params(SHAPES, torch.float32, "cuda")
    params = make_params(SHAPES, torch.float32, "cuda")
    eager_opt = cls(eager, lr=base_lr, weight_decay=1e-2, backend="native")
    opt = cls(params, lr=base_lr, weight_decay=1e-2, backend="native")
    step = torch.compile(opt.step, fullgraph=True)
    for t in range(1, 11):
        for p, q, g in zip(params, eager, synthetic_grads(params, t)):
            p.grad, q.grad = g, g.clone()
        step()
        eager_opt.step()
    assert_same_trajectory((eager, eager_opt), (params, opt), torch.float32)


# ------------------------------------------------------------------------- state_dict
@pytest.mark.cuda
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_state_dict_from_gpu_continues_on_cpu(native_cuda, cls, base_lr) -> None:
    """Save after 10 native-CUDA steps, load into a CPU optimizer, continue: same as staying on the GPU."""
    params = make_params(SHAPES, torch.bfloat16, "cuda")
    opt = cls(params, lr=base_lr, weight_decay=1e-2, master_weights=True, backend="native")

    def steps(ps, o, first, last):
        for t in range(first, last + 1):
            o.param_groups[0]["lr"] = lr_at(t, base_lr)
            for p, g in zip(ps, synthetic_grads(ps, t)):
                p.grad = g
            o.step()

    steps(params, opt, 1, 10)
    saved = copy.deepcopy(opt.state_dict())
    cpu_params = [p.detach().cpu().requires_grad_(True) for p in params]
    cpu_opt = cls(cpu_params, lr=base_lr, weight_decay=1e-2, master_weights=True, backend="reference")
    cpu_opt.load_state_dict(saved)
    steps(params, opt, 11, 20)
    steps(cpu_params, cpu_opt, 11, 20)
    assert_same_trajectory((params, opt), (cpu_params, cpu_opt), torch.bfloat16)
