"""The native CPU kernels (csrc/cpu, maths of csrc/common/step_math.h) against the reference backend.

Every LARS/LAMB option over harness.SHAPES (empty, 1, odd, multi-chunk) for 30 steps with a changing
lr, params and state compared; fp32, bf16 and fp16 params with and without fp32 master weights; fp32
and bf16 params mixed in one group; channels_last params; thread-count independence of the norms;
every intra-op thread used (cpu_parallel); GradScaler unscale and overflow skip; a state_dict moved
between backends mid-run; opcheck on each op; clear errors for bad tensors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fastlars
from fastlars import backends
from harness import SHAPES, assert_same_trajectory, lr_at, make_params, run_trajectory, synthetic_grads

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("native", torch.device("cpu")) is not None,
    reason=f"native CPU kernels not built: {backends.unavailable_reason('native', torch.device('cpu'))}",
)

LARS_OPTIONS = [
    {"weight_decay": 1e-2},
    {"weight_decay": 1e-2, "momentum_style": "torch"},
    {"weight_decay": 1e-2, "nesterov": True},
    {"weight_decay": 1e-2, "nesterov": True, "momentum_style": "torch"},
    {"weight_decay": 1e-2, "trust_clip": True},
    {"weight_decay": 1e-2, "trust_ratio_bounds": (0.01, 10.0), "eps": 1e-8},
    {"weight_decay": 0.0},  # adapt defaults to False: ratio 1, no norm pass
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
STORAGE = [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False),
           (torch.float16, False)]


def _trajectory(cls, options, backend, dtype=torch.float32, master=False, shapes=SHAPES, base_lr=1.0, steps=30,
                **kw):
    def make(params):
        return cls(params, lr=base_lr, backend=backend, master_weights=master, **options)

    return run_trajectory(make, shapes=shapes, dtype=dtype, steps=steps, base_lr=base_lr, **kw)


def test_auto_picks_native_on_cpu(monkeypatch) -> None:
    from fastlars._extension import extension

    monkeypatch.delenv("FASTLARS_BACKEND", raising=False)
    assert "cpu" in extension().kernel_devices()
    assert backends.resolve("auto", torch.device("cpu")) == "native"
    assert fastlars.LAMB([torch.zeros(3, requires_grad=True)])._backend_for(0, torch.device("cpu")) == "native"


@pytest.mark.parametrize("options", LARS_OPTIONS, ids=str)
def test_lars_options_match_reference(options) -> None:
    ref = _trajectory(fastlars.LARS, options, "reference")
    nat = _trajectory(fastlars.LARS, options, "native")
    assert_same_trajectory(ref, nat, torch.float32)


@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=str)
def test_lamb_options_match_reference(options) -> None:
    ref = _trajectory(fastlars.LAMB, options, "reference", base_lr=0.01)
    nat = _trajectory(fastlars.LAMB, options, "native", base_lr=0.01)
    assert_same_trajectory(ref, nat, torch.float32)


@pytest.mark.parametrize("dtype,master", [s for s in STORAGE if s[0] == torch.float32 or s[1]], ids=str)
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_dtypes_and_master_weights_match_reference(cls, base_lr, dtype, master) -> None:
    options = {"weight_decay": 1e-2}
    ref = _trajectory(cls, options, "reference", dtype=dtype, master=master, base_lr=base_lr)
    nat = _trajectory(cls, options, "native", dtype=dtype, master=master, base_lr=base_lr)
    assert_same_trajectory(ref, nat, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_low_precision_without_masters_is_as_accurate_as_the_reference(cls, base_lr, dtype) -> None:
    """bf16/fp16 weights and moments with no fp32 copy: a last-bit difference in a norm flips a rounding
    of w, and the 30-step trajectories drift apart by a few ulps of the storage dtype. So the rule is
    flash-attention's: the kernels' error against an fp32 run is at most twice the reference's (plus
    one storage ulp)."""
    options = {"weight_decay": 1e-2}
    exact = _trajectory(cls, options, "reference", dtype=torch.float32, base_lr=base_lr)
    ref = _trajectory(cls, options, "reference", dtype=dtype, base_lr=base_lr)
    nat = _trajectory(cls, options, "native", dtype=dtype, base_lr=base_lr)
    _assert_as_accurate_as_reference(exact, ref, nat, dtype)


def _assert_as_accurate_as_reference(exact, ref, nat, dtype) -> None:
    """Every param and state tensor of `nat` is at most twice as far from the fp32 run `exact` as the
    reference's run `ref` is (plus one ulp of `dtype` at the tensor's scale)."""
    ulp = torch.finfo(dtype).eps
    for i, (e, r, n) in enumerate(zip(exact[0], ref[0], nat[0])):
        if e.numel() == 0:
            continue
        tensors = [(e.detach(), r.detach(), n.detach())]
        tensors += [(exact[1].state[e][k], ref[1].state[r][k], nat[1].state[n][k]) for k in exact[1].state[e]
                    if k != "step"]
        for x, y, z in tensors:
            ref_err = (y.float() - x.float()).abs().max().item()
            nat_err = (z.float() - x.float()).abs().max().item()
            scale = x.float().abs().max().item()
            assert nat_err <= 2 * ref_err + ulp * scale, f"tensor {i}: native error {nat_err:.3g} vs {ref_err:.3g}"


def _mixed_dtype_run(cls, base_lr, backend, steps=30):
    """fp32 and bf16 params with masters in one group; bf16 moments next to fp32 ones (no master on one)."""
    params = make_params([(33, 17), (1031,), (0,), (5, 5), (40_000,)], torch.float32)
    for i in (1, 4):
        params[i] = params[i].detach().to(torch.bfloat16).requires_grad_(True)
    opt = cls([{"params": params[:4], "master_weights": True}, {"params": params[4:]}], lr=base_lr,
              weight_decay=1e-2, backend=backend)
    for t in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(t, base_lr)
        for p, g in zip(params, synthetic_grads(params, t)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_mixed_dtypes_in_one_group(cls, base_lr) -> None:
    assert_same_trajectory(_mixed_dtype_run(cls, base_lr, "reference"), _mixed_dtype_run(cls, base_lr, "native"),
                           torch.bfloat16)


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_channels_last_params(cls, base_lr) -> None:
    def hook(params):
        return [p.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True) for p in params]

    def run(backend):
        params = hook(make_params([(8, 3, 5, 5), (16, 8, 3, 3)], torch.float32))
        opt = cls(params, lr=base_lr, weight_decay=1e-2, backend=backend)
        for t in range(1, 11):
            for p, g in zip(params, synthetic_grads(params, t)):
                p.grad = g.contiguous(memory_format=torch.channels_last)
            opt.step()
        return params, opt

    assert_same_trajectory(run("reference"), run("native"), torch.float32)


def test_grad_norms_do_not_depend_on_threads() -> None:
    impl = backends.load("native")
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in (0, 1, 7, 16_384, 16_385, 300_001)]
    grads.append(torch.randn(4099, generator=gen).to(torch.bfloat16))
    scale = torch.tensor(1024.0)
    threads = torch.get_num_threads()
    try:
        first = impl.grad_norms(grads, scale)
        torch.set_num_threads(1)
        single = impl.grad_norms(grads, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    expected = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]) / 1024.0
    torch.testing.assert_close(first.double(), expected, rtol=1e-6, atol=0)


def test_kernel_passes_run_on_every_intra_op_thread() -> None:
    """A serial build must never ship: with torch's OpenMP backend the extension is compiled with
    -fopenmp, and a pass through the kernels' chunk loop runs on exactly torch.get_num_threads() threads
    (OpenMP gives each thread of the team a fixed slice, so this is a count, not a timing)."""
    from fastlars._extension import extension

    ext = extension()
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            report = ext.cpu_parallel()
            assert report["runtime"] == ("openmp" if openmp else "native")
            assert report["threads"] == n
            assert report["threads_used"] == n if openmp else 1 <= report["threads_used"] <= n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_one_openmp_runtime_in_the_process() -> None:
    """The extension links torch's own libgomp: two OpenMP runtimes would each keep a thread team."""
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if any(name in line.rsplit("/", 1)[-1] for name in ("libgomp", "libomp", "libiomp"))}
    assert len(runtimes) <= 1, runtimes


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_nonfinite_gradient_skips_the_whole_step(cls, base_lr) -> None:
    def poison(step, grads):
        if step == 7:
            grads[-1].view(-1)[3] = float("nan")

    ref = _trajectory(cls, {"weight_decay": 1e-2}, "reference", base_lr=base_lr, grad_hook=poison)
    nat = _trajectory(cls, {"weight_decay": 1e-2}, "native", base_lr=base_lr, grad_hook=poison)
    assert_same_trajectory(ref, nat, torch.float32)
    assert nat[1].skipped_steps == 1 and all(torch.isfinite(p).all() for p in nat[0])


@pytest.mark.parametrize("cls,lr", ALGOS, ids=["lars", "lamb"])
def test_grad_scaler_unscales_in_kernel_and_skips_overflow(cls, lr) -> None:
    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        opt = cls(model.parameters(), lr=lr, weight_decay=1e-2, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        for step in range(12):
            opt.zero_grad()
            loss = model(x).square().mean() * (1e35 if step == 4 else 1.0)  # step 4 overflows
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return model, scaler

    (ref, ref_scaler), (nat, nat_scaler) = run("reference"), run("native")
    assert ref_scaler.get_scale() == nat_scaler.get_scale() < 2.0**14
    for a, b in zip(ref.parameters(), nat.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_state_dict_moves_between_backends_mid_run(cls, base_lr) -> None:
    """15 native steps, state_dict into a reference optimizer, 15 more: equals 30 reference steps."""
    straight = _trajectory(cls, {"weight_decay": 1e-2}, "reference", base_lr=base_lr)
    params = make_params(SHAPES, torch.float32)
    first = cls(params, lr=base_lr, weight_decay=1e-2, backend="native")

    def steps(opt, ts):
        for t in ts:
            for group in opt.param_groups:
                group["lr"] = lr_at(t, base_lr)
            for p, g in zip(params, synthetic_grads(params, t)):
                p.grad = g
            opt.step()

    steps(first, range(1, 16))
    second = cls(params, lr=base_lr, weight_decay=1e-2, backend="reference")
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    steps(second, range(16, 31))
    assert_same_trajectory(straight, (params, second), torch.float32)


def _op_samples() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(0)

    def tensors(dtype=torch.float32):
        return [torch.randn(n, generator=gen).to(dtype) for n in (5, 0, 16_390)]

    params, grads = tensors(), tensors()
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    steps = [torch.ones(()) for _ in params]
    found_inf = torch.zeros(1)
    return {
        "grad_norms": (grads, torch.tensor(2.0)),
        "lars_step_": (params, grads, tensors(), [], norms, 0.1, None, 0.9, 1e-4, 1e-3, 0.0, False, False, True, True,
                       None, False, None, found_inf),
        "lamb_step_": (tensors(), grads, tensors(), [t.abs() for t in tensors()], [], steps, 1e-3,
                       torch.tensor(1e-3), 0.9, 0.999, 1e-6, 0.01, True, True, False, False, True,
                       [0.01, 10.0], False, None, None, found_inf),
    }


@pytest.mark.parametrize("name", ["grad_norms", "lars_step_", "lamb_step_"])
def test_opcheck(name) -> None:
    """torch.library.opcheck: schema (mutations declared), fake tensor and dispatch of the CPU kernels."""
    torch.library.opcheck(getattr(torch.ops.fastlars, name).default, _op_samples()[name])


@pytest.mark.parametrize("name", ["lars_step_", "lamb_step_"])
def test_opcheck_with_the_trust_ratio_output(name) -> None:
    sample = _op_samples()[name]
    torch.library.opcheck(getattr(torch.ops.fastlars, name).default, (*sample, torch.empty(len(sample[0]))))
    with pytest.raises(RuntimeError, match=r"trust_ratios: expected a contiguous 1-D float32 CPU tensor of 3"):
        getattr(torch.ops.fastlars, name)(*sample, torch.empty(2))


def test_kernels_reject_bad_tensors_by_name() -> None:
    ops = torch.ops.fastlars
    w, g, v = torch.randn(8), torch.randn(8), torch.zeros(8)
    norms = torch.ones(1)
    args = (0.1, None, 0.9, 0.0, 1e-3, 0.0, False, False, True, True, None, False, None, None)
    with pytest.raises(RuntimeError, match=r"grads\[0\]: shape"):
        ops.lars_step_([w], [torch.randn(9)], [v], [], norms, *args)
    with pytest.raises(RuntimeError, match=r"grads\[0\]: dtype"):
        ops.lars_step_([w], [g.double()], [v], [], norms, *args)
    with pytest.raises(RuntimeError, match=r"params\[0\]: dtype Double"):
        ops.lars_step_([w.double()], [g.double()], [v.double()], [], norms, *args)
    with pytest.raises(RuntimeError, match=r"momentum_buffers: holds 2 tensors"):
        ops.lars_step_([w], [g], [v, v], [], norms, *args)
    with pytest.raises(RuntimeError, match=r"master_params\[0\]: expected float32"):
        ops.lars_step_([w.bfloat16()], [g.bfloat16()], [v], [w.half()], norms, *args)
    with pytest.raises(RuntimeError, match=r"trust_ratio_bounds"):
        ops.lars_step_([w], [g], [v], [], norms, *args[:10], [2.0, 1.0], *args[11:])
    with pytest.raises(RuntimeError, match=r"found_inf: expected one element"):
        ops.lars_step_([w], [g], [v], [], norms, *args[:-1], torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"grads\[0\]: the CPU kernels need a dense tensor"):
        ops.grad_norms([torch.randn(8, 2)[:, 0]], None)
    before = w.clone()
    with pytest.raises(RuntimeError):
        ops.lars_step_([w], [g], [v], [], torch.ones(2), *args)
    assert torch.equal(w, before)


# Several groups of tensors (csrc/cpu/tensor_groups.h: about 2^18 elements each, a bigger tensor alone),
# with empty and tiny tensors at group edges, so LAMB's pass 2 reads u from the workspace at many offsets.
GROUP_SHAPES = [(600_000,), (0,), (700, 1000), (5,), (1_100_000,), (0,), (300,), (3, 7), (65_537,), (1031,)]


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)],
                         ids=str)
@pytest.mark.parametrize("options", [{}, {"decoupled_decay": True}, {"max_grad_norm": 1.0}], ids=str)
def test_lamb_over_several_groups_matches_reference(options, dtype, master) -> None:
    """Both passes of a group run before the next group's; u goes through the workspace."""
    ref = _trajectory(fastlars.LAMB, options, "reference", dtype=dtype, master=master, shapes=GROUP_SHAPES,
                      base_lr=0.01)
    nat = _trajectory(fastlars.LAMB, options, "native", dtype=dtype, master=master, shapes=GROUP_SHAPES,
                      base_lr=0.01)
    if dtype == torch.float32:
        assert_same_trajectory(ref, nat, dtype)
    else:  # over 10^6 bf16 elements a last-bit difference somewhere flips a rounding (grads depend on w)
        exact = _trajectory(fastlars.LAMB, options, "reference", shapes=GROUP_SHAPES, base_lr=0.01)
        _assert_as_accurate_as_reference(exact, ref, nat, dtype)


def test_lamb_huge_tensor_matches_the_reference_and_float64() -> None:
    """A tensor of 2^24 + 5 elements: native equals the reference within fp32 tolerance, and both are
    within 1e-6 of the float64 formulas (torch.linalg.vector_norm's fp32 CPU sum, which the reference
    no longer uses, is off by ~6.5e-4 relative at this size)."""
    import numpy as np

    import formulas

    shapes, steps = [(3,), ((1 << 24) + 5,), (7,)], 3
    ref = _trajectory(fastlars.LAMB, {}, "reference", shapes=shapes, base_lr=0.01, steps=steps)
    nat = _trajectory(fastlars.LAMB, {}, "native", shapes=shapes, base_lr=0.01, steps=steps)
    assert_same_trajectory(ref, nat, torch.float32)
    params = make_params(shapes, torch.float32)
    ws = [p.detach().double().numpy().ravel().copy() for p in params]
    states = [formulas.LambState(np.zeros_like(w), np.zeros_like(w)) for w in ws]
    for t in range(1, steps + 1):
        current = [torch.tensor(w, dtype=torch.float32).reshape(p.shape) for w, p in zip(ws, params)]
        grads = [g.double().numpy().ravel() for g in synthetic_grads(current, t)]
        ws = [formulas.lamb_update(w, g, st, lr_at(t, 0.01), 1.0, {}) for w, g, st in zip(ws, grads, states)]
    for i, (w, r, n) in enumerate(zip(ws, ref[0], nat[0])):
        for name, run in (("reference", r), ("native", n)):
            err = np.abs(run.detach().double().numpy().ravel() - w).max()
            assert err <= 1e-6, f"tensor {i}: {name} is {err:.3g} from the float64 formulas"


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)],
                         ids=str)
def test_lamb_groups_beyond_the_workspace_limit_recompute_their_update(monkeypatch, dtype, master) -> None:
    """Groups of more than FASTLARS_LAMB_WORKSPACE_ELEMENTS keep no u between the passes: pass 2 recomputes
    it from the new moments (fp32 state) or from the old moments and g (bf16 state)."""
    monkeypatch.setenv("FASTLARS_LAMB_WORKSPACE_ELEMENTS", "100000")
    shapes = [(5,), (300_001,), (0,), (333, 301), (7, 3)]  # groups: [5] stores u; [300001], [0, 100233, 21] do not
    ref = _trajectory(fastlars.LAMB, {}, "reference", dtype=dtype, master=master, shapes=shapes, base_lr=0.01)
    nat = _trajectory(fastlars.LAMB, {}, "native", dtype=dtype, master=master, shapes=shapes, base_lr=0.01)
    if dtype == torch.float32:
        assert_same_trajectory(ref, nat, dtype)
    else:
        exact = _trajectory(fastlars.LAMB, {}, "reference", shapes=shapes, base_lr=0.01)
        _assert_as_accurate_as_reference(exact, ref, nat, dtype)



@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
def test_lamb_stores_or_recomputes_its_update_to_the_same_bits(monkeypatch, state_dtype) -> None:
    """Keeping u between the passes (groups up to the workspace limit, which follows the machine's cache) and
    recomputing it in pass 2 give the same bits, for every state format: the limit is a speed choice only."""
    shapes = [(5,), (300_001,), (333, 301), (7, 3), (4096,)]
    runs = []
    for limit in ("0", "100000000"):  # every group recomputes u / every group stores it
        monkeypatch.setenv("FASTLARS_LAMB_WORKSPACE_ELEMENTS", limit)
        runs.append(_trajectory(fastlars.LAMB, {"state_dtype": state_dtype}, "native", shapes=shapes, base_lr=0.01,
                                steps=12))
    (p0, o0), (p1, o1) = runs
    for i, (a, b) in enumerate(zip(p0, p1)):
        assert torch.equal(a, b), f"param {i}"
    for i, (a, b) in enumerate(zip(o0.param_groups[0]["params"], o1.param_groups[0]["params"])):
        for key, value in o0.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, o1.state[b][key]), f"param {i}: state {key!r}"

_ISA_SCRIPT = r"""
import sys, torch, fastlars
from fastlars._extension import extension
sys.path.insert(0, sys.argv[1])
from harness import make_params, synthetic_grads, lr_at
out = {"isa": extension().cpu_isa(), "threads": extension().cpu_parallel()["threads_used"]}
shapes = [(0,), (1,), (7,), (17, 33), (16_385,), (600_000,), (700, 1000), (1031,)]
for name, cls, lr, opts in [("lars", fastlars.LARS, 1.0, {"weight_decay": 1e-2, "nesterov": True}),
                            ("lamb", fastlars.LAMB, 0.01, {"max_grad_norm": 1.0}),
                            ("lamb_decoupled", fastlars.LAMB, 0.01, {"decoupled_decay": True}),
                            ("lamb_bf16", fastlars.LAMB, 0.01, {})]:
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    params = make_params(shapes, dtype)
    opt = cls(params, lr=lr, backend="native", **opts)
    for t in range(1, 11):
        for group in opt.param_groups:
            group["lr"] = lr_at(t, lr)
        for p, g in zip(params, synthetic_grads(params, t)):
            p.grad = g
        opt.step()
    out[name] = [p.detach().clone() for p in params] + [s.clone() for p in params for s in opt.state[p].values()]
torch.save(out, sys.argv[2])
"""


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them, whatever FASTLARS_CPU_ISA caps (empty off Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def test_every_cpu_instruction_set_build_gives_identical_results(tmp_path) -> None:
    """The element loops are built for the baseline, AVX2 and AVX-512 (csrc/cpu/kernels_*.cpp) and picked
    by the CPU; FASTLARS_CPU_ISA caps the choice. Each build must give bit-identical params and state, on 1
    thread as on 2 (norms are per-chunk partial sums added in chunk order)."""
    import os
    import subprocess
    import sys

    if not {"avx2", "avx512f"} & _cpu_flags():
        pytest.skip("this CPU has neither AVX2 nor AVX-512 (/proc/cpuinfo): only the baseline build can run")
    runs = {}
    for cap, threads in (("baseline", 2), ("avx2", 2), ("avx512", 2), ("avx512", 1)):
        out = tmp_path / f"{cap}_{threads}.pt"
        env = {**os.environ, "FASTLARS_CPU_ISA": cap, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(Path(__file__).parent), str(out)], env=env,
                       check=True, timeout=600)
        runs[cap, threads] = torch.load(out)
    isas = [run["isa"] for run in runs.values()]
    assert isas[0] == "baseline" and len(set(isas)) > 1, isas
    assert [run["threads"] for run in runs.values()] == [2, 2, 2, 1]
    base = runs["baseline", 2]
    for (_, threads), run in runs.items():
        for name in ("lars", "lamb", "lamb_decoupled", "lamb_bf16"):
            for i, (a, b) in enumerate(zip(base[name], run[name])):
                assert torch.equal(a, b), (f"{name} tensor {i}: the {run['isa']} build on {threads} threads differs "
                                           "from the baseline on 2")


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)],
                         ids=str)
@pytest.mark.parametrize("scale", [None, 1024.0], ids=["unscaled", "scaled"])
def test_lars_folded_grad_norms_match_the_separate_pass(dtype, master, scale) -> None:
    """An empty grad_norms makes lars_step_ take ||g|| in its norm pass beside ||w|| (one read of the
    gradients less): params, momentum, masters and trust ratios bit-identical to the separate grad_norms
    op, for every shape (empty, one, odd, several chunks, groups of many tensors) and grad_scale."""
    gen = torch.Generator().manual_seed(0)
    shapes = [*SHAPES, (300_001,), *[(1000,)] * 40]
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * (scale or 1.0)).to(dtype) for s in shapes]
    grad_scale = None if scale is None else torch.tensor(scale)

    def run(norms):
        params = [b.to(dtype, copy=True) for b in base]
        buffers = [torch.zeros(s, dtype=torch.float32 if master else dtype) for s in shapes]
        masters = [b.clone() for b in base] if master else []
        ratios = torch.empty(len(shapes))
        torch.ops.fastlars.lars_step_(params, grads, buffers, masters, norms, 0.5, None, 0.9, 1e-2, 1e-3, 0.0, True,
                                      False, True, True, None, False, grad_scale, None, ratios)
        return [*params, *buffers, *masters, ratios]

    separate = run(torch.ops.fastlars.grad_norms(grads, grad_scale))
    folded = run(torch.empty(0))
    assert all(torch.equal(a, b) for a, b in zip(separate, folded))
    assert not torch.equal(separate[-1], torch.ones(len(shapes)))  # the ratios did adapt


def test_lars_with_a_grad_scaler_reads_the_gradients_once_less(monkeypatch) -> None:
    """With a GradScaler its found_inf is the skip flag, so the CPU LARS step computes no separate
    gradient norms (the kernel folds them into its norm pass); without one it must, before any write."""
    from fastlars.backends import native

    calls = []
    real = native.grad_norms
    monkeypatch.setattr(native, "grad_norms", lambda *a: calls.append(1) or real(*a))
    params = make_params(SHAPES, torch.float32)
    opt = fastlars.LARS(params, lr=1.0, weight_decay=1e-2, backend="native")
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    opt.step()
    assert len(calls) == 1
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    scaler.step(opt)
    assert len(calls) == 1
