"""The Triton backend's low-precision step (fastlars/backends/triton/lowbit.py): the interpreted CPU suite,
the sm_90 compile check and the GPU suite.

On every machine: tests/test_triton_lowbit_interpreted.py in a subprocess with TRITON_INTERPRET=1 (the
kernels against reference_lowbit on CPU tensors); every kernel specialisation below compiles to an sm_90
cubin (no GPU needed) whose PTX has no fused multiply-add, approximate division or approximate square
root (the spec's IEEE rounding) and keeps the (x + 2^23) − 2^23 rounding of the encoders; backend="auto"
resolves low-precision groups on CUDA to triton.

On a GPU (marked ``cuda``): the same trajectories as the interpreted suite (GPU_STEPS steps), CUDA tensors on
both sides.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlars import backends

ROOT = Path(__file__).resolve().parent.parent
_TRITON_MISSING = backends.unavailable_reason("triton", torch.device("cuda"))
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(_INTERPRETED, reason="this process runs triton's interpreter: the suite runs it directly")
@pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"triton backend: {_TRITON_MISSING}")
def test_interpreted_lowbit_suite() -> None:
    """tests/test_triton_lowbit_interpreted.py in its own process with TRITON_INTERPRET=1; it must pass entirely."""
    environ = os.environ | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           str(ROOT / "tests" / "test_triton_lowbit_interpreted.py")]
    result = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"interpreted suite failed:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"triton backend: {_TRITON_MISSING}")
def test_auto_steps_low_precision_state_on_cuda_with_triton(monkeypatch) -> None:
    """Where the extension has no native CUDA low-precision kernels (this machine's CPU build), "auto" takes the
    next backend of the CUDA order that has: triton; with them, native comes first."""
    monkeypatch.delenv(backends.ENV_OVERRIDE, raising=False)
    cuda = torch.device("cuda")
    assert backends.low_precision_unavailable_reason("triton", cuda) is None
    native_cuda = backends.low_precision_unavailable_reason("native", cuda) is None
    first = "native" if native_cuda else "triton"
    assert backends.resolve_low_precision("auto", cuda) == first
    assert backends.resolve_low_precision("auto", torch.device("cpu")) in ("native", "reference")
    monkeypatch.setenv(backends.ENV_OVERRIDE, "native")  # taken only where native steps such state on CUDA
    assert backends.resolve_low_precision("auto", cuda) == first
    monkeypatch.setenv(backends.ENV_OVERRIDE, "reference")
    assert backends.resolve_low_precision("auto", cuda) == "reference"


@pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"triton backend: {_TRITON_MISSING}")
def test_signatures_are_the_specs() -> None:
    import inspect

    from fastlars.backends import reference_lowbit
    from fastlars.backends.triton import lowbit

    for name in ("lamb_step", "lars_step"):
        assert inspect.signature(getattr(lowbit, name)) == inspect.signature(getattr(reference_lowbit, name)), name


# ------------------------------------------------------------------------------- sm_90 PTX
_POINTERS = {"addr_table": "*i64", "scale_table": "*i64", "row_ptr": "*i64", "bpr_ptr": "*i64",
             "nblocks_ptr": "*i64", "chunk_tensor_ptr": "*i32", "chunk_block_ptr": "*i64", "index_ptr": "*i32",
             "keys_ptr": "*i64", "offsets_ptr": "*i64"}
_INTS = {"n_tensors", "n_chunks", "n_out"}


def _specialisations() -> list[tuple[str, dict]]:
    import triton.language as tl

    f32, bf16, f16, u8 = (0, tl.float32), (1, tl.uint16), (2, tl.float16), (3, tl.uint8)

    def kinds(**arrays: tuple[int, object]) -> dict:
        out = {}
        for name, (kind, dtype) in arrays.items():
            out[f"{name}_KIND"], out[f"{name}_DTYPE"] = kind, dtype
        return out

    lamb = ["MASTER", "ROUNDED", "ADAPT", "BIAS_CORRECTION", "WEIGHT_DECAY", "DECOUPLED", "TRUST_CLIP", "BOUNDS",
            "MAXIMIZE", "LR_TENSOR", "HAS_SCALE", "HAS_CLIP"]
    lars = ["MASTER", "ROUNDED", "ADAPT", "NESTEROV", "TRUST_CLIP", "MLPERF", "BOUNDS", "MAXIMIZE", "LR_TENSOR",
            "HAS_SCALE"]
    out = []
    for arrays, pass_, flags in [
        (kinds(P=f32, G=f32, M=u8, V=u8), 1, "ADAPT BIAS_CORRECTION WEIGHT_DECAY HAS_SCALE HAS_CLIP MAXIMIZE"),
        (kinds(P=bf16, G=bf16, M=u8, V=u8), 2, "ROUNDED ADAPT BIAS_CORRECTION WEIGHT_DECAY TRUST_CLIP BOUNDS"),
        (kinds(P=bf16, G=bf16, M=bf16, V=bf16), 0, "MASTER WEIGHT_DECAY DECOUPLED LR_TENSOR"),
        (kinds(P=f16, G=f16, M=f32, V=u8), 1, "MASTER ADAPT WEIGHT_DECAY DECOUPLED"),
    ]:
        out.append(("lamb_lowbit_kernel", {**arrays, "PASS": pass_, **{f: f in flags for f in lamb},
                                           "QB": 8, "BLOCK": 256}))
    for arrays, flags in [
        (kinds(P=bf16, G=bf16, V=u8), "ROUNDED ADAPT TRUST_CLIP BOUNDS MLPERF HAS_SCALE"),
        (kinds(P=f32, G=f32, V=bf16), "ADAPT NESTEROV MAXIMIZE LR_TENSOR"),
        (kinds(P=bf16, G=bf16, V=u8), "MASTER MLPERF NESTEROV"),
    ]:
        out.append(("lars_lowbit_kernel", {**arrays, **{f: f in flags for f in lars}, "QB": 8, "BLOCK": 256}))
    return out


@pytest.mark.skipif(_INTERPRETED, reason="this process runs triton's interpreter")
@pytest.mark.skipif(_TRITON_MISSING is not None, reason=f"triton backend: {_TRITON_MISSING}")
def test_lowbit_kernels_compile_for_sm90_with_ieee_rounding(tmp_path, monkeypatch) -> None:
    """triton.compile of each specialisation to an sm_90 cubin with the launches' options
    (enable_fp_fusion=False, 8 warps): no fma.rn.f32, div.full/approx or sqrt.approx in the PTX, and
    kernels that encode keep the 2^23 constant of their rint (no algebraic folding of (x + 2^23) − 2^23)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastlars.backends.triton import lowbit_kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for name, constexprs in _specialisations():
        fn = getattr(lowbit_kernels, name)
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in _INTS:
                signature[arg] = "i32"
            elif arg.endswith("_ptr") or arg in _POINTERS:
                signature[arg] = _POINTERS.get(arg, "*fp32")
            else:
                signature[arg] = "fp32"
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 8, "enable_fp_fusion": False})
        what = f"{name} {constexprs}"
        assert compiled.asm.get("cubin"), f"{what}: no cubin"
        ptx = compiled.asm["ptx"]
        inexact = re.findall(r"\b(?:fma\.rn\.f32|div\.(?:full|approx)\.[a-z0-9.]*f32|sqrt\.approx\.[a-z0-9.]*f32)", ptx)
        assert inexact == [], f"{what}: {sorted(set(inexact))} in the PTX"
        encodes = name == "lars_lowbit_kernel" or constexprs["PASS"] != 2
        if encodes and 3 in (constexprs.get("M_KIND"), constexprs.get("V_KIND")):
            assert "0f4B000000" in ptx, f"{what}: the rint constant 2^23 is gone"


# ------------------------------------------------------------------------------------ GPU
def _cuda_pair(algo: str, shapes, dtype: torch.dtype, master: bool, steps: int, rounding=None, kinds=None,
               **step_kw) -> dict[str, float]:
    """test_native_lowbit.run_pair on CUDA tensors: the reference and the Triton kernels side by side."""
    import test_native_lowbit as nl

    from fastlars.backends import quantization as q
    from fastlars.backends import reference_lowbit as rl
    from fastlars.backends.triton import lowbit

    h, lr = (nl.LAMB_H, 0.02) if algo == "lamb" else (nl.LARS_H, 0.5)
    h = type(h)(**{**h.__dict__, **step_kw.pop("options", {})})
    kinds = nl.MIXED if kinds is None else kinds
    sides = []
    for module in (rl, lowbit):
        side = nl.Side(module, algo, shapes, dtype, master, kinds)
        side.params = [p.cuda() for p in side.params]
        side.masters = None if side.masters is None else [m.cuda() for m in side.masters]
        side.buffers = [[q.QuantizedBuffer(b.codes.cuda(), b.absmax.cuda(), b.code_map)
                         if isinstance(b, q.QuantizedBuffer) else b.cuda() for b in bufs] for bufs in side.buffers]
        sides.append(side)
    ref, tri = sides
    worst = {"ratio": 0.0}
    for t in range(1, steps + 1):
        step_lr = lr * (1.0 + 0.5 * math.sin(0.7 * t))
        r_ref = ref.step(t, step_lr, h, rounding, **step_kw)
        if t % 10 == 0:
            _, r_tri = nl.check_one_step(tri, t, step_lr, h, rounding, **step_kw)
        else:
            r_tri = tri.step(t, step_lr, h, rounding, **step_kw)
        worst["ratio"] = max(worst["ratio"], ((r_ref - r_tri).abs() / r_ref.abs()).max().item())
    worst.update(nl.compare_state(ref, tri))
    worst["weight"] = max(((a - b).abs().max() / a.abs().max()).item() if a.numel() and a.dtype == torch.float32
                          else 0.0 for a, b in zip(ref.weights, tri.weights))
    nl._assert_trajectory(algo, worst)
    return worst


GPU_SHAPES = [(1,), (255,), (256,), (257,), (4095,), (4096,), (4097,), (3, 300), (2, 3, 5, 37), (517, 1031), (0,)]
GPU_STEPS = int(os.environ.get("FASTLARS_GPU_ORACLE_STEPS", "30"))
"""Steps of the GPU trajectories (the one-step oracle every 10 steps; FASTLARS_GPU_ORACLE_STEPS=200 in the GPU
session's `oracle` call). The reference steps on the GPU
tensor by tensor, about 1,100-3,700 small torch operations a step on these shapes (about 15 µs each on the
H200's host: 17-55 ms a step), and every specialisation of the kernels compiles once (about 0.65 s each for
sm_90 on the 2-core EPYC; the trajectory and option tests below ask for 43, counted under the interpreter); the
GPU session's tests stage has 150 s for every `cuda` test. The interpreted
suite takes the fp32 trajectories 200 steps on every machine."""


@pytest.mark.cuda
@pytest.mark.parametrize("algo", ["lamb", "lars"])
@pytest.mark.parametrize("config", ["fp32", "bf16_master", "bf16_rounding"])
def test_gpu_trajectories_follow_the_reference(algo: str, config: str) -> None:
    from fastlars.backends import reference_lowbit as rl

    dtype = torch.float32 if config == "fp32" else torch.bfloat16
    rounding = rl.StochasticRounding(1234, list(range(len(GPU_SHAPES)))) if config == "bf16_rounding" else None
    _cuda_pair(algo, GPU_SHAPES, dtype, config == "bf16_master", GPU_STEPS, rounding=rounding)


@pytest.mark.cuda
@pytest.mark.parametrize("options", [{"decoupled_decay": True, "trust_clip": True, "maximize": True},
                                     {"adapt": False, "bias_correction": False}], ids=str)
def test_gpu_lamb_options_with_a_grad_scale(options: dict) -> None:
    _cuda_pair("lamb", GPU_SHAPES[:9], torch.float32, False, 20, options=options,
               grad_scale=torch.tensor(1024.0, device="cuda"), clip_coef=torch.tensor(0.37, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("options", [{"momentum_style": "torch", "nesterov": True}, {"trust_clip": True}], ids=str)
def test_gpu_lars_options_with_a_grad_scale(options: dict) -> None:
    _cuda_pair("lars", GPU_SHAPES[:9], torch.float32, False, 20, options=options,
               grad_scale=torch.tensor(8.0, device="cuda"))


@pytest.mark.cuda
def test_gpu_found_inf_writes_nothing() -> None:
    import test_native_lowbit as nl

    from fastlars.backends import reference
    from fastlars.backends.triton import lowbit

    side = nl.Side(lowbit, "lamb", GPU_SHAPES[:9], torch.bfloat16, False, {})
    side.params = [p.cuda() for p in side.params]
    side.buffers = [[type(b)(b.codes.cuda(), b.absmax.cuda(), b.code_map) for b in bufs] for bufs in side.buffers]
    side.step(1, 0.02, nl.LAMB_H)
    before = side.snapshot()
    grads = [g.cuda() for g in nl._grads(side.weights, 2)]
    grads[3][0] = float("nan")
    flag = torch.ones((), device="cuda")
    lowbit.lamb_step(side.params, grads, *side.buffers, None, side.steps, lr=0.02, h=nl.LAMB_H, clip_coef=None,
                     grad_scale=torch.tensor(4.0, device="cuda"), found_inf=flag)
    lars_side = nl.Side(lowbit, "lars", GPU_SHAPES[:9], torch.float32, False, {})
    lars_side.params = [p.cuda() for p in lars_side.params]
    lars_side.buffers = [[type(b)(b.codes.cuda(), b.absmax.cuda(), b.code_map) for b in bufs]
                         for bufs in lars_side.buffers]
    lars_before = lars_side.snapshot()
    lars_grads = [g.float() for g in grads]
    lowbit.lars_step(lars_side.params, lars_grads, lars_side.buffers[0], None, reference.grad_norms(lars_grads, None),
                     lr=0.5, h=nl.LARS_H, grad_scale=None, found_inf=flag)
    assert all(torch.equal(a, b) for a, b in zip(before, side.snapshot()))
    assert all(torch.equal(a, b) for a, b in zip(lars_before, lars_side.snapshot()))


@pytest.mark.cuda
def test_gpu_steps_do_not_synchronise_the_host() -> None:
    """With lr, the step counts, grad_scale and found_inf on the GPU, a LAMB and a LARS step with int8 state and
    stochastic rounding make no synchronising CUDA call (torch.cuda.set_sync_debug_mode('error')) once the
    device tables exist (the first step builds them)."""
    import test_native_lowbit as nl

    from fastlars.backends import quantization as q
    from fastlars.backends import reference_lowbit as rl
    from fastlars.backends.triton import lowbit

    shapes = [(4097,), (3, 300), (0,)]
    rounding = rl.StochasticRounding(5, [0, 1, 2])
    params = [p.cuda().to(torch.bfloat16) for p in nl._params(shapes, torch.float32)]
    grads = [torch.randn_like(p) for p in params]
    m = [q.QuantizedBuffer.zeros_like(p, q.SIGNED_MAP) for p in params]
    v = [q.QuantizedBuffer.zeros_like(p, q.UNSIGNED_MAP) for p in params]
    steps = [torch.ones((), device="cuda") for _ in params]
    cuda = dict(lr=torch.tensor(0.01, device="cuda"), grad_scale=torch.tensor(2.0, device="cuda"),
                found_inf=torch.zeros((), device="cuda"), rounding=rounding)
    norms = torch.ones(len(params), device="cuda")
    for sync_mode in ("default", "error"):
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            lowbit.lamb_step(params, grads, m, v, None, steps, h=nl.LAMB_H, clip_coef=None, **cuda)
            lowbit.lars_step(params, grads, m, None, norms, steps, h=nl.LARS_H, **cuda)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.float()).all() for p in params)
