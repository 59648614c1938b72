"""The Triton backend: availability rules, the interpreted CPU suite, and the GPU suite.

On every machine: the kernels against the reference on CPU tensors under the Triton interpreter
(tests/test_triton_interpreted.py, run here in a subprocess because TRITON_INTERPRET=1 changes triton
for the whole process); without the interpreter the backend is unavailable on CPU with a reason that
names TRITON_INTERPRET, and naming it raises; without triton, ``import fastlars`` still works and the
backend says why it is unavailable; every kernel specialisation compiles to an sm_90 cubin (no GPU
needed to compile) whose PTX loads and stores parameters, gradients and state as 128-bit vectors.

On a GPU (marked ``cuda``): every LARS/LAMB option over harness.SHAPES for 30 steps, fp32 params and state
(exp_avg, exp_avg_sq, momentum buffers) within harness.STATE_RTOL of the reference; bf16/fp16 params
with and without fp32 masters; GradScaler with an overflow step; no host synchronisation; CUDA-graph
capture with a tensor lr; torch.compile(fullgraph=True) with inductor; opcheck on the CUDA kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastlars
from fastlars import backends
from harness import (
    SHAPES,
    assert_same_trajectory,
    assert_state_tight,
    lr_at,
    make_params,
    run_trajectory,
    synthetic_grads,
)

ROOT = Path(__file__).resolve().parent.parent
_TRITON_MISSING = backends.unavailable_reason("triton", torch.device("cuda"))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"triton backend: {_TRITON_MISSING}")
def test_interpreted_suite() -> None:
    """tests/test_triton_interpreted.py in its own process with TRITON_INTERPRET=1; it must pass entirely."""
    environ = os.environ | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           str(ROOT / "tests" / "test_triton_interpreted.py")]
    result = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=800)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"interpreted Triton suite failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process runs triton's interpreter")
@pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"triton backend: {_TRITON_MISSING}")
def test_cpu_needs_the_interpreter() -> None:
    reason = backends.unavailable_reason("triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert "triton" not in backends.available_backends("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastlars.LARS([torch.zeros(3, requires_grad=True)], lr=0.1, backend="triton")
    assert backends.resolve("auto", torch.device("cpu")) != "triton"


def test_without_triton_fastlars_imports_and_explains() -> None:
    result = _run_python("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, fastlars
        from fastlars import backends
        reason = backends.unavailable_reason("triton", torch.device("cuda"))
        assert reason is not None and "triton cannot be imported" in reason, reason
        assert "triton" not in fastlars.available_backends("cpu")
        try:
            fastlars.LAMB([torch.zeros(3, requires_grad=True)], backend="triton")
        except RuntimeError as exc:
            assert "triton cannot be imported" in str(exc), exc
        else:
            raise AssertionError("backend='triton' without triton did not raise")
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"triton backend: {_TRITON_MISSING}")
def test_host_lr_tensor_is_refused_during_capture(monkeypatch) -> None:
    """A CPU lr tensor for CUDA params is read once as a float; during CUDA-graph capture that value would be
    frozen into the graph, so it is refused with the native op's message (capture faked: no GPU here)."""
    from fastlars.backends.triton import ops as triton_ops

    dummy = torch.zeros(1)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert triton_ops._lr_args(0.0, torch.tensor(0.25), cuda, dummy)[0] == 0.25  # not capturing: read on the host
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"lr_tensor: on the CPU while a CUDA graph is being captured.*frozen"):
        triton_ops._lr_args(0.0, torch.tensor(0.25), cuda, dummy)
    assert triton_ops._lr_args(0.5, None, cuda, dummy)[0] == 0.5  # a float lr is a kernel argument: fine
    assert triton_ops._lr_args(0.0, torch.tensor(0.25), torch.device("cpu"), dummy)[2]  # CPU params: read in-kernel


# ------------------------------------------------------- the compiled (GPU) kernels, built without a GPU
def _specialisations():
    """(kernel name, constexprs) for the compiled paths: every dtype, pass and option flag at least once,
    16-byte aligned buckets (vector accesses) and unaligned ones (scalar)."""
    import triton.language as tl

    f32, bf16, f16 = tl.float32, tl.bfloat16, tl.float16
    out = [("sumsq_partials_kernel", {"DTYPE": d, "ALIGNED": a, "CHUNK": 65_536, "BLOCK": 2048})
           for d, a in ((f32, True), (bf16, True), (f16, True), (bf16, False))]
    out += [("sum_chunks_kernel", {"SQRT": q, "HAS_SCALE": q, "BLOCK": 256}) for q in (True, False)]
    lars = ["MASTER", "ADAPT", "NESTEROV", "TRUST_CLIP", "MLPERF", "BOUNDS", "MAXIMIZE", "LR_TENSOR", "HAS_SCALE",
            "ALIGNED"]
    for p_dtype, flags in [(f32, "ADAPT MLPERF ALIGNED"), (bf16, " ".join(lars)), (f16, "NESTEROV HAS_SCALE ALIGNED"),
                           (f32, "ADAPT")]:
        master = "MASTER" in flags
        v_dtype = f32 if master else p_dtype
        out.append(("lars_update_kernel", {"P_DTYPE": p_dtype, "G_DTYPE": p_dtype, "V_DTYPE": v_dtype,
                                           **{f: f in flags for f in lars}, "CHUNK": 65_536, "BLOCK": 2048}))
    lamb = ["MASTER", "STORE_MOMENTS", "FROM_MOMENTS", "ADAPT", "BIAS_CORRECTION", "DECOUPLED", "TRUST_CLIP",
            "BOUNDS", "MAXIMIZE", "LR_TENSOR", "HAS_SCALE", "HAS_CLIP", "ALIGNED"]
    for p_dtype, pass_, flags in [(f32, 1, "STORE_MOMENTS ADAPT BIAS_CORRECTION ALIGNED"),
                                  (f32, 2, "STORE_MOMENTS FROM_MOMENTS ADAPT DECOUPLED TRUST_CLIP BOUNDS LR_TENSOR "
                                           "ALIGNED"),
                                  (bf16, 1, "MASTER STORE_MOMENTS ADAPT HAS_SCALE HAS_CLIP MAXIMIZE ALIGNED"),
                                  (bf16, 2, "ADAPT DECOUPLED BOUNDS MAXIMIZE ALIGNED"),
                                  (f16, 2, "BIAS_CORRECTION ALIGNED"), (f16, 2, "MASTER")]:
        master = "MASTER" in flags
        out.append(("lamb_kernel", {"P_DTYPE": p_dtype, "G_DTYPE": p_dtype, "S_DTYPE": f32 if master or p_dtype == f32
                                    else p_dtype, "PASS": pass_, **{f: f in flags for f in lamb},
                                    "CHUNK": 65_536, "BLOCK": 2048}))
    return out


def _main_arrays(name: str, c: dict) -> tuple[list, list]:
    """(dtypes loaded, dtypes stored) per element of a full block: the parameter, gradient and state arrays."""
    import triton.language as tl

    if name == "sumsq_partials_kernel":
        return [c["DTYPE"]], []
    w = [tl.float32] if c["MASTER"] else []
    weights = tl.float32 if c["MASTER"] else c["P_DTYPE"]
    if name == "lars_update_kernel":
        return [weights, c["G_DTYPE"], c["V_DTYPE"]], [c["V_DTYPE"], c["P_DTYPE"], *w]
    loads = [weights, c["S_DTYPE"], c["S_DTYPE"]]
    loads += [] if c["FROM_MOMENTS"] else [c["G_DTYPE"]]
    if c["PASS"] == 1:
        return loads, [c["S_DTYPE"]] * 2 if c["STORE_MOMENTS"] else []
    return loads, ([] if c["FROM_MOMENTS"] else [c["S_DTYPE"]] * 2) + [c["P_DTYPE"], *w]


def _v4_count(dtypes: list, block: int, warps: int) -> int:
    """128-bit accesses per thread for one block of each array: elements per thread · bytes / 16."""
    per_thread = block // (32 * warps)
    return sum(per_thread * d.primitive_bitwidth // 8 // 16 for d in dtypes)


_POINTER_TYPES = {"addr_table": "*i64", "numel_ptr": "*i64", "chunk_tensor_ptr": "*i32", "chunk_start_ptr": "*i64",
                  "index_ptr": "*i32", "first_chunk_ptr": "*i32"}
_INT_ARGS = {"n_tensors", "row", "n_chunks", "n_out"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process runs triton's interpreter")
@pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"triton backend: {_TRITON_MISSING}")
def test_kernels_compile_for_sm90_with_vector_accesses(tmp_path, monkeypatch) -> None:
    """triton.compile of every specialisation to an sm_90 cubin (no GPU needed): the compiled path type-checks
    and lowers, which the interpreter (helpers run as plain Python) cannot show; with the launches'
    enable_fp_fusion=False, the PTX has no fma.rn.f32, div.full/approx or sqrt.approx (IEEE rounding).

    And the PTX accesses parameter, gradient and state arrays 128 bits at a time: for an aligned bucket,
    exactly one ``ld.global.v4`` per 16 bytes per thread of every array a full block loads (4 fp32 or
    8 bf16/fp16 each), and ``st.global.v4`` likewise for every array it stores; an unaligned bucket has
    none (its pointers promise nothing).
    """
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastlars.backends.triton import kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    warps = 8
    for name, constexprs in _specialisations():
        fn = getattr(kernels, name)
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in _INT_ARGS:
                signature[arg] = "i32"
            elif arg.endswith("_ptr") or arg == "addr_table":
                signature[arg] = _POINTER_TYPES.get(arg, "*fp32")
            else:
                signature[arg] = "fp32"
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "enable_fp_fusion": False})  # as ops.py launches
        what = f"{name} {constexprs}"
        assert compiled.asm.get("cubin"), f"{what}: no cubin"
        ptx = compiled.asm["ptx"]
        # The reference's rounding: IEEE division and square root, no contraction into fma (an H200 run
        # with div.full.f32, sqrt.approx.f32 and fma drifted from the reference by a few ulp).
        inexact = re.findall(r"\b(?:fma\.rn\.f32|div\.(?:full|approx)\.[a-z0-9.]*f32|sqrt\.approx\.[a-z0-9.]*f32)", ptx)
        assert inexact == [], f"{what}: {sorted(set(inexact))} in the PTX"
        if name == "sum_chunks_kernel":
            continue
        loads, stores = _main_arrays(name, constexprs)
        aligned = constexprs["ALIGNED"]
        expected = (_v4_count(loads, constexprs["BLOCK"], warps) if aligned else 0,
                    _v4_count(stores, constexprs["BLOCK"], warps) if aligned else 0)
        found = (len(re.findall(r"\bld\.global(?:\.[a-z]+)*\.v4\.", ptx)),
                 len(re.findall(r"\bst\.global(?:\.[a-z]+)*\.v4\.", ptx)))
        assert found == expected, f"{what}: (ld.global.v4, st.global.v4) = {found}, expected {expected}"


# ------------------------------------------------------------------------------------ GPU
LARS_OPTIONS = [
    {"weight_decay": 1e-2},
    {"weight_decay": 1e-2, "momentum_style": "torch"},
    {"weight_decay": 1e-2, "nesterov": True},
    {"weight_decay": 1e-2, "nesterov": True, "momentum_style": "torch"},
    {"weight_decay": 1e-2, "trust_clip": True},
    {"weight_decay": 1e-2, "trust_ratio_bounds": (0.01, 10.0), "eps": 1e-8},
    {"weight_decay": 0.0},
    {"weight_decay": 0.0, "adapt": True, "maximize": True},
]
LAMB_OPTIONS = [
    {},
    {"bias_correction": False},
    {"grad_averaging": False},
    {"decoupled_decay": True},
    {"trust_clip": True, "trust_ratio_bounds": (0.01, 10.0)},
    {"max_grad_norm": 1.0},
    {"weight_decay": 0.0},
    {"weight_decay": 0.0, "adapt": True, "maximize": True},
]
ALGOS = [(fastlars.LARS, 1.0), (fastlars.LAMB, 0.01)]
STORAGE = [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False), (torch.float16, False)]


@pytest.fixture
def triton_cuda() -> None:
    """Fail (not skip) when a GPU is visible but the Triton backend cannot use it."""
    reason = backends.unavailable_reason("triton", torch.device("cuda"))
    assert reason is None, f"triton backend unusable on CUDA: {reason}"


def _trajectory(cls, options, backend, dtype=torch.float32, master=False, base_lr=1.0, **kw):
    def make(params):
        return cls(params, lr=base_lr, backend=backend, master_weights=master, **options)

    return run_trajectory(make, shapes=SHAPES, dtype=dtype, steps=30, base_lr=base_lr, device="cuda", **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=str)
def test_gpu_lars_options_match_reference(triton_cuda, options) -> None:
    ref, tri = _trajectory(fastlars.LARS, options, "reference"), _trajectory(fastlars.LARS, options, "triton")
    assert_same_trajectory(ref, tri, torch.float32)
    assert_state_tight(ref, tri)


@pytest.mark.cuda
@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=str)
def test_gpu_lamb_options_match_reference(triton_cuda, options) -> None:
    ref = _trajectory(fastlars.LAMB, options, "reference", base_lr=0.01)
    tri = _trajectory(fastlars.LAMB, options, "triton", base_lr=0.01)
    assert_same_trajectory(ref, tri, torch.float32)
    assert_state_tight(ref, tri)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,master", STORAGE, ids=str)
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_gpu_low_precision_matches_reference(triton_cuda, cls, base_lr, dtype, master) -> None:
    options = {"weight_decay": 1e-2}
    assert_same_trajectory(_trajectory(cls, options, "reference", dtype, master, base_lr),
                           _trajectory(cls, options, "triton", dtype, master, base_lr), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,lr", ALGOS, ids=["lars", "lamb"])
def test_gpu_grad_scaler_with_overflow(triton_cuda, cls, lr) -> None:
    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
        opt = cls(fastlars.param_groups(model, 1e-2), lr=lr, backend=backend)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
        gen = torch.Generator().manual_seed(1)
        for t in range(12):
            x = torch.randn(64, 16, generator=gen).cuda()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean() * (1e6 if t == 5 else 1.0)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return list(model.parameters()), opt

    assert_same_trajectory(run("reference"), run("triton"), torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,kw", [(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2, "trust_clip": True}),
                                    (fastlars.LAMB, {"lr": 0.01, "max_grad_norm": 1.0})], ids=["lars", "lamb"])
def test_gpu_step_never_synchronizes_with_the_host(triton_cuda, cls, kw) -> None:
    params = make_params(SHAPES, torch.bfloat16, "cuda")
    opt = cls(params, backend="triton", master_weights=True, **kw)
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    opt.step()  # compiles the kernels, builds the tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("cls,kw,base_lr", [(fastlars.LARS, {"weight_decay": 1e-2, "trust_clip": True}, 1.0),
                                            (fastlars.LAMB, {"max_grad_norm": 1.0}, 0.01)], ids=["lars", "lamb"])
def test_gpu_cuda_graph_capture_with_tensor_lr(triton_cuda, cls, kw, base_lr) -> None:
    eager_params = make_params(SHAPES, torch.float32, "cuda")
    eager = cls(eager_params, lr=torch.tensor(base_lr, device="cuda"), capturable=True, backend="triton", **kw)
    params = make_params(SHAPES, torch.float32, "cuda")
    lr = torch.tensor(base_lr, device="cuda")
    opt = cls(params, lr=lr, capturable=True, backend="triton", **kw)
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
    assert_same_trajectory((eager_params, eager), (params, opt), torch.float32)


@pytest.mark.cuda
def test_gpu_captured_tables_are_kept_and_new_ones_refused_in_capture(triton_cuda) -> None:
    """The device tables a captured graph reads survive cache eviction; a table that would have to be
    built (copied from the host) during a capture is refused with a clear error."""
    from fastlars.backends.triton import tables

    params = make_params(SHAPES, torch.float32, "cuda")
    opt = fastlars.LARS(params, lr=torch.tensor(1.0, device="cuda"), weight_decay=1e-2, capturable=True,
                        backend="triton")
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    captured = set(tables._captured)
    assert captured and captured <= set(tables._cache)
    others = [torch.zeros(3 + i, device="cuda") for i in range(tables._CACHE_SIZE + 5)]
    for t in others:
        tables.buckets([[t]], 4096)
    assert captured <= set(tables._cache) and len(tables._cache) <= tables._CACHE_SIZE + len(captured)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
    fresh = torch.zeros(7, device="cuda")
    with pytest.raises(RuntimeError, match="no device table yet"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        tables.buckets([[fresh]], 4096)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_gpu_compiled_step_fullgraph(triton_cuda, cls, base_lr) -> None:
    torch._dynamo.reset()
    eager = make_params(SHAPES, torch.float32, "cuda")
    params = make_params(SHAPES, torch.float32, "cuda")
    eager_opt = cls(eager, lr=base_lr, weight_decay=1e-2, backend="triton")
    opt = cls(params, lr=base_lr, weight_decay=1e-2, backend="triton")
    step = torch.compile(opt.step, fullgraph=True)
    for t in range(1, 11):
        for p, q, g in zip(params, eager, synthetic_grads(params, t)):
            p.grad, q.grad = g, g.clone()
        step()
        eager_opt.step()
    assert_same_trajectory((eager, eager_opt), (params, opt), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["grad_norms", "lars_step_", "lamb_step_"])
def test_gpu_opcheck(triton_cuda, name) -> None:
    params = [p.detach() for p in make_params([(0,), (5,), (3, 4), (70_000,)], torch.float32, "cuda")]
    grads = synthetic_grads(params, 1)
    like = [torch.zeros_like(p) for p in params]
    norms = torch.stack([g.norm() for g in grads])
    one = torch.tensor(1.0, device="cuda")
    samples = {
        "grad_norms": (grads, torch.tensor(2.0, device="cuda")),
        "lars_step_": (params, grads, like, [], norms, 0.1, None, 0.9, 1e-2, 1e-3, 0.0, False, False, True, True,
                       None, False, None, torch.tensor(0.0, device="cuda")),
        "lamb_step_": (params, grads, like, [torch.zeros_like(p) for p in params], [], [one] * 4, 0.01,
                       torch.tensor(0.01, device="cuda"), 0.9, 0.999, 1e-6, 1e-2, True, True, False, False, True,
                       None, False, None, None, None),
    }
    torch.library.opcheck(getattr(torch.ops.fastlars, "triton_" + name).default, samples[name])
