"""The native CUDA kernels (csrc/cuda) against the reference backend.

On every machine (no GPU needed):
- the chunk planner (csrc/cuda/chunk_plan.h) as a host C++ test;
- the kernel sources themselves under a host emulation of the CUDA execution model
  (csrc/cuda/test/emu: threads as coroutines, barriers, warp shuffles), through ctypes and through
  the torch glue ops.cpp built for the CPU key of a test namespace: every option, every storage
  dtype, master weights, skips, tensor lr, waves, more tensors than one launch holds, misaligned
  views, error messages. The emulation checks logic, not speed or memory-model races
  (compute-sanitizer on a GPU does that: tests/cuda_sanitizer_check.py).

On a GPU (marked ``cuda``; skipped with that reason where none is visible, and FAILING rather than
skipping when a GPU is visible but fastlars._C has no CUDA kernels): every LARS/LAMB option over
harness.SHAPES for 30 steps with a changing lr; fp32, bf16 and fp16 params with and without fp32
master weights; more tensors than one launch holds; a tensor of more than 2^31 elements when the
GPU has the memory; bit-identical norms across runs; GradScaler unscale and found_inf skip; no
host synchronisation; CUDA-graph capture with capturable=True and a tensor lr;
torch.compile(fullgraph=True); torch.library.opcheck; a state_dict saved on the GPU continued on
the CPU.
"""

from __future__ import annotations

import copy
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import cuda_accesses
import pytest
import torch

import fastlars
from fastlars import backends, functional
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


def _trajectory(cls, options, backend, dtype=torch.float32, master=False, shapes=SHAPES, base_lr=1.0, steps=30,
                **kw):
    def make(params):
        return cls(params, lr=base_lr, backend=backend, master_weights=master, **options)

    return run_trajectory(make, shapes=shapes, dtype=dtype, steps=steps, base_lr=base_lr, device="cuda", **kw)


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


# ------------------------------------------------------------- the kernels under host emulation
# csrc/cuda/test/emu runs the .cu sources unchanged on the CPU (threads as coroutines, blocks in
# turn), so the kernels' indexing, vector and scalar paths, reductions and skip logic are checked
# against the reference on every machine. EmulatedCuda has the backend interface of
# fastlars.backends.reference and stands in for "native" in the optimizers below.
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cuda_include_dir() -> Path | None:
    """A directory holding cuda_bf16.h and cuda_runtime_api.h: a toolkit or torch's nvidia wheels."""
    candidates = [Path(p) / "include" for p in sorted(Path("/usr/local").glob("cuda*"), reverse=True)]
    for entry in sys.path:
        candidates += sorted((Path(entry) / "nvidia").glob("*/include"))
    return next((c for c in candidates if (c / "cuda_bf16.h").is_file() and (c / "cuda_runtime_api.h").is_file()),
                None)


@pytest.fixture(scope="module")
def emulated_cuda(tmp_path_factory: pytest.TempPathFactory):
    """Builds csrc/cuda/*.cu + the emulator into a shared library (about 5 s) and wraps it."""
    compiler = shutil.which("c++") or shutil.which("g++")
    include = _cuda_include_dir()
    if compiler is None or include is None:
        pytest.skip(f"needs a C++ compiler ({compiler}) and the CUDA headers ({include}) to emulate the kernels")
    out = tmp_path_factory.mktemp("cuda_emu")
    cuda_dir = ROOT / "csrc" / "cuda"
    flags = ["-std=c++17", "-O1", "-fPIC", "-U_FORTIFY_SOURCE", "-DFASTLARS_CUDA_EMULATION",
             "-I", str(cuda_dir), "-I", str(include)]
    objects = []
    for src in [*sorted(cuda_dir.glob("*.cu")), cuda_dir / "test" / "emu" / "emu_ops.cpp"]:
        obj = out / (src.stem + ".o")
        lang = ["-x", "c++", "-include", str(cuda_dir / "test" / "emu" / "cuda_emu.h")] if src.suffix == ".cu" else []
        subprocess.run([compiler, *flags, *lang, "-c", str(src), "-o", str(obj)], check=True)
        objects.append(str(obj))
    lib = out / "libfastlars_cuda_emu.so"
    subprocess.run([compiler, "-shared", *objects, "-o", str(lib)], check=True)
    return EmulatedCuda(ctypes.CDLL(str(lib)))


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _float_ptr(t: torch.Tensor | None):
    if t is None:
        return None
    assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


class EmulatedCuda:
    """The CUDA kernels under host emulation, with the backend interface (tensors on the CPU)."""

    def __init__(self, lib: ctypes.CDLL, wave_bytes: int = 0) -> None:
        self.lib = lib
        self.wave_bytes = wave_bytes
        self.calls = 0

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None if device.type == "cpu" else "the emulation runs on host memory"

    def _common(self, params, masters):
        numel = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])
        dtype = (ctypes.c_int * len(params))(*[_DTYPE_CODE[p.dtype] for p in params])
        if masters is None:
            master_list = [None] * len(params)
        else:
            master_list = [None if m is p else m for m, p in zip(masters, params)]
        return numel, dtype, master_list

    @staticmethod
    def _lr(lr):
        if isinstance(lr, torch.Tensor):
            lr = lr.detach().to(torch.float32).reshape(1).contiguous()
            return lr, _float_ptr(lr), 0.0
        return None, None, float(lr)

    def access_counts(self) -> tuple[int, int]:
        """(16-byte vector accesses, one-element accesses) of main arrays since the last call."""
        out = (ctypes.c_int64 * 2)()
        self.lib.fl_emu_access_counts(out)
        return out[0], out[1]

    def grad_norms(self, grads, grad_scale):
        self.calls += 1
        out = torch.empty(len(grads), dtype=torch.float32)
        numel, dtype, _ = self._common(grads, None)
        scale = None if grad_scale is None else grad_scale.float().reshape(1).contiguous()
        self.lib.fl_emu_grad_norms(len(grads), _ptrs(grads), numel, dtype, _float_ptr(scale), _float_ptr(out))
        return out

    def lars_step(self, params, grads, momentum_buffers, master_params, grad_norms, *, lr, h, grad_scale, found_inf,
                  trust_ratios=None):
        self.calls += 1
        numel, dtype, masters = self._common(params, master_params)
        keep, lr_ptr, lr_value = self._lr(lr)
        lo, hi = h.trust_ratio_bounds or (0.0, 0.0)
        f = (ctypes.c_double * 6)(h.momentum, h.weight_decay, h.trust_coefficient, h.eps, lo, hi)
        b = (ctypes.c_int * 6)(h.nesterov, h.trust_clip, h.momentum_style == "mlperf", h.adapt,
                               h.trust_ratio_bounds is not None, h.maximize)
        norms = grad_norms.float().contiguous()
        scale = None if grad_scale is None else grad_scale.float().reshape(1).contiguous()
        inf = None if found_inf is None else found_inf.float().reshape(1).contiguous()
        self.lib.fl_emu_lars_step(len(params), _ptrs(params), _ptrs(grads), _ptrs(momentum_buffers), _ptrs(masters),
                                  numel, dtype, _float_ptr(norms), lr_ptr, ctypes.c_float(lr_value), f, b,
                                  _float_ptr(scale), _float_ptr(inf), ctypes.c_int64(self.wave_bytes))
        del keep

    def lamb_step(self, params, grads, exp_avgs, exp_avg_sqs, master_params, steps, *, lr, h, clip_coef, grad_scale,
                  found_inf):
        self.calls += 1
        numel, dtype, masters = self._common(params, master_params)
        keep, lr_ptr, lr_value = self._lr(lr)
        lo, hi = h.trust_ratio_bounds or (0.0, 0.0)
        f = (ctypes.c_double * 6)(h.beta1, h.beta2, h.eps, h.weight_decay, lo, hi)
        b = (ctypes.c_int * 7)(h.bias_correction, h.grad_averaging, h.decoupled_decay, h.trust_clip, h.adapt,
                               h.trust_ratio_bounds is not None, h.maximize)
        step_values = torch.stack([s.float().reshape(()) for s in steps]).contiguous()
        clip = None if clip_coef is None else clip_coef.float().reshape(1).contiguous()
        scale = None if grad_scale is None else grad_scale.float().reshape(1).contiguous()
        inf = None if found_inf is None else found_inf.float().reshape(1).contiguous()
        self.lib.fl_emu_lamb_step(len(params), _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_sqs),
                                  _ptrs(masters), numel, dtype, _float_ptr(step_values), lr_ptr,
                                  ctypes.c_float(lr_value), f, b, _float_ptr(clip), _float_ptr(scale),
                                  _float_ptr(inf), ctypes.c_int64(self.wave_bytes))
        del keep


@pytest.fixture
def emulated_native(emulated_cuda, monkeypatch):
    """backend="native" on the CPU runs the CUDA kernels under emulation for this test."""
    emulated_cuda.calls = 0
    monkeypatch.setitem(backends._LOADED, "native", emulated_cuda)
    return emulated_cuda


EMU_SHAPES = [(0,), (1,), (7,), (3, 5), (17, 33), (0,), (1031,), (16_385,), (0,)]


def _emu_pair(cls, options, dtype=torch.float32, master=False, base_lr=1.0, steps=8, shapes=EMU_SHAPES, **kw):
    def make(backend):
        return lambda params: cls(params, lr=base_lr, backend=backend, master_weights=master, **options)

    ref = run_trajectory(make("reference"), shapes=shapes, dtype=dtype, steps=steps, base_lr=base_lr, **kw)
    emu = run_trajectory(make("native"), shapes=shapes, dtype=dtype, steps=steps, base_lr=base_lr, **kw)
    return ref, emu


@pytest.mark.parametrize("options", LARS_OPTIONS, ids=str)
def test_emulated_lars_kernels_match_reference(emulated_native, options) -> None:
    ref, emu = _emu_pair(fastlars.LARS, options)
    assert emulated_native.calls > 0
    assert_same_trajectory(ref, emu, torch.float32)


@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=str)
def test_emulated_lamb_kernels_match_reference(emulated_native, options) -> None:
    ref, emu = _emu_pair(fastlars.LAMB, options, base_lr=0.01)
    assert emulated_native.calls > 0
    assert_same_trajectory(ref, emu, torch.float32)


@pytest.mark.parametrize("dtype,master", STORAGE[1:], ids=str)
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_emulated_low_precision_storage(emulated_native, cls, base_lr, dtype, master) -> None:
    ref, emu = _emu_pair(cls, {"weight_decay": 1e-2}, dtype=dtype, master=master, base_lr=base_lr)
    assert_same_trajectory(ref, emu, dtype)


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_emulated_skip_tensor_lr_and_waves(emulated_native, cls, base_lr) -> None:
    """Non-finite grads skip the step; a tensor lr is read by the kernels; 1-byte waves (one tensor each)."""

    def hook(step, grads):
        if step == 3:
            grads[4].view(-1)[7] = float("nan")

    emulated_native.wave_bytes = 1

    def make(backend):
        return lambda params: cls(params, lr=torch.tensor(base_lr), weight_decay=1e-2, backend=backend)

    ref = run_trajectory(make("reference"), shapes=EMU_SHAPES, steps=6, base_lr=base_lr, grad_hook=hook)
    emu = run_trajectory(make("native"), shapes=EMU_SHAPES, steps=6, base_lr=base_lr, grad_hook=hook)
    emulated_native.wave_bytes = 0
    assert_same_trajectory(ref, emu, torch.float32)
    assert emu[1].skipped_steps == 1


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_emulated_more_tensors_than_one_table(emulated_native, cls, base_lr) -> None:
    shapes = [(0,) if i % 97 == 0 else (1 + (i * 37) % 50,) for i in range(1200)] + [(0,)]
    ref, emu = _emu_pair(cls, {"weight_decay": 1e-2}, base_lr=base_lr, steps=2, shapes=shapes)
    assert_same_trajectory(ref, emu, torch.float32)


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_emulated_mixed_dtypes_in_one_group(emulated_native, cls, base_lr) -> None:
    ref = _mixed_dtype_run(cls, base_lr, "reference", "cpu", steps=6)
    emu = _mixed_dtype_run(cls, base_lr, "native", "cpu", steps=6)
    assert_same_trajectory(ref, emu, torch.bfloat16)


def test_emulated_misaligned_tensors_take_the_scalar_path(emulated_native) -> None:
    """Views one element into their storage are not 16-byte aligned: the kernels' scalar loop runs."""
    for cls, base_lr in ALGOS:
        runs = []
        for backend in ("reference", "native"):
            base = [torch.randn(n + 1, generator=torch.Generator().manual_seed(n)) for n in (9, 1031, 16_390)]
            params = [b[1:].requires_grad_(True) for b in base]
            opt = cls(params, lr=base_lr, weight_decay=1e-2, backend=backend)
            for t in range(1, 5):
                for p, g in zip(params, synthetic_grads(params, t)):
                    p.grad = g
                opt.step()
            runs.append((params, opt))
        assert_same_trajectory(runs[0], runs[1], torch.float32)


_CPP_TYPE = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16", torch.float16: "__half"}


@pytest.mark.parametrize("dtype,master,offset_bytes",
                         [(d, m, o) for d, m in STORAGE for o in (0, 8, 2) if o % d.itemsize == 0], ids=str)
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_emulated_accesses_are_16_bytes_wide(emulated_native, monkeypatch, cls, base_lr, dtype, master,
                                             offset_bytes) -> None:
    """Every main-array access of a vector iteration is 16 bytes, for every storage dtype: counted under the
    emulation (which aborts on a misaligned vector access) against tests/cuda_accesses.py over a full chunk
    and a partial one with a tail. A view not 16-byte aligned (8 or 2 bytes into its storage) takes the scalar
    path in every kernel whose lists include it, and the results agree with the reference either way."""
    n = 16_384 + 8 * 3 + 5
    t = _CPP_TYPE[dtype]
    offset = offset_bytes // dtype.itemsize  # elements into the storage
    norm_calls = []
    inner_norms = emulated_native.grad_norms
    monkeypatch.setattr(emulated_native, "grad_norms", lambda *a: norm_calls.append(1) or inner_norms(*a))
    runs, steps = [], 3
    for backend in ("reference", "native"):
        base = torch.randn(n + offset, generator=torch.Generator().manual_seed(5)).to(dtype)
        params = [base[offset:].requires_grad_(True)]
        opt = cls(params, lr=base_lr, weight_decay=1e-2, master_weights=master, backend=backend)
        emulated_native.access_counts()
        for step in range(1, steps + 1):
            for p, g in zip(params, synthetic_grads(params, step)):
                p.grad = g
            opt.step()
        runs.append((params, opt))
    assert_same_trajectory(runs[0], runs[1], dtype)

    width = cuda_accesses.vector_elems(t)
    if cls is fastlars.LARS:
        kernels = [cuda_accesses.Kernel("lars_pass1", t, master), cuda_accesses.Kernel("lars_pass2", t, master)]
    else:
        kernels = [cuda_accesses.Kernel("lamb_pass1", t, master),
                   cuda_accesses.Kernel("lamb_pass2", t, master, cuda_accesses.stores_moments(t, master))]
    runs_of = [(k, steps) for k in kernels] + [(cuda_accesses.Kernel("sumsq_kernel", t), len(norm_calls))]
    vector = scalar = 0
    for k, times in runs_of:
        loads, stores = cuda_accesses.arrays(k)
        # the lists a kernel checks: sumsq reads the (fresh) grads, LARS pass 1 only w (the master when kept)
        aligned = offset == 0 or k.name == "sumsq_kernel" or (k.name == "lars_pass1" and master)
        full = n - n % width if aligned else 0
        vector += times * (full // width) * cuda_accesses.packs(loads + stores, t)
        scalar += times * (n - full) * len(loads + stores)
    assert emulated_native.access_counts() == (vector, scalar)


def test_emulated_grad_norms(emulated_native) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in (0, 1, 7, 16_384, 40_000)]
    grads.append(torch.randn(1031, generator=gen).to(torch.bfloat16))
    scale = torch.tensor(8.0)
    norms = emulated_native.grad_norms(grads, scale)
    assert torch.equal(norms, emulated_native.grad_norms(grads, scale))
    expected = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).float() / 8.0
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0.0)


# ---------------------------------------------------- the torch glue (ops.cpp) under emulation
# ops.cpp built with FASTLARS_CUDA_EMULATION registers the same functions for the CPU key of the
# namespace fastlars_emu; the schemas below are the op contract csrc/cuda/ops.cpp implements.
OP_SCHEMAS = (
    "grad_norms(Tensor[] grads, Tensor? grad_scale) -> Tensor",
    "lars_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, "
    "Tensor grad_norms, float lr, Tensor? lr_tensor, float momentum, float weight_decay, float trust_coefficient, "
    "float eps, bool nesterov, bool trust_clip, bool mlperf_momentum, bool adapt, float[]? trust_ratio_bounds, "
    "bool maximize, Tensor? grad_scale, Tensor? found_inf, Tensor(d!)? trust_ratios=None) -> ()",
    "lamb_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] master_params, Tensor[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, "
    "float weight_decay, bool bias_correction, bool grad_averaging, bool decoupled_decay, bool trust_clip, "
    "bool adapt, float[]? trust_ratio_bounds, bool maximize, Tensor? clip_coef, Tensor? grad_scale, "
    "Tensor? found_inf, Tensor(e!)? trust_ratios=None) -> ()",
)


class OpsBackend:
    """The backend interface over the three fastlars ops of one namespace (what the native backend
    does on CUDA): lr as a float, or a tensor the kernels read on the device."""

    def __init__(self, namespace: str) -> None:
        self.ops = getattr(torch.ops, namespace)
        self.calls = 0

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    @staticmethod
    def _lr(lr):
        return (0.0, lr) if isinstance(lr, torch.Tensor) else (float(lr), None)

    def access_counts(self) -> tuple[int, int]:
        """(16-byte vector accesses, one-element accesses) of main arrays since the last call."""
        out = (ctypes.c_int64 * 2)()
        self.lib.fl_emu_access_counts(out)
        return out[0], out[1]

    def grad_norms(self, grads, grad_scale):
        self.calls += 1
        return self.ops.grad_norms(grads, grad_scale)

    def lars_step(self, params, grads, momentum_buffers, master_params, grad_norms, *, lr, h, grad_scale, found_inf,
                  trust_ratios=None):
        self.calls += 1
        lr_value, lr_tensor = self._lr(lr)
        bounds = None if h.trust_ratio_bounds is None else [float(b) for b in h.trust_ratio_bounds]
        self.ops.lars_step_(params, grads, momentum_buffers, master_params or [], grad_norms, lr_value, lr_tensor,
                            h.momentum, h.weight_decay, h.trust_coefficient, h.eps, h.nesterov, h.trust_clip,
                            h.momentum_style == "mlperf", h.adapt, bounds, h.maximize, grad_scale, found_inf,
                            trust_ratios)

    def lamb_step(self, params, grads, exp_avgs, exp_avg_sqs, master_params, steps, *, lr, h, clip_coef, grad_scale,
                  found_inf, trust_ratios=None):
        self.calls += 1
        lr_value, lr_tensor = self._lr(lr)
        bounds = None if h.trust_ratio_bounds is None else [float(b) for b in h.trust_ratio_bounds]
        self.ops.lamb_step_(params, grads, exp_avgs, exp_avg_sqs, master_params or [], steps, lr_value, lr_tensor,
                            h.beta1, h.beta2, h.eps, h.weight_decay, h.bias_correction, h.grad_averaging,
                            h.decoupled_decay, h.trust_clip, h.adapt, bounds, h.maximize, clip_coef, grad_scale,
                            found_inf, trust_ratios)


@pytest.fixture(scope="module")
def emulated_glue(tmp_path_factory: pytest.TempPathFactory):
    """Builds ops.cpp + the kernels with FASTLARS_CUDA_EMULATION as a torch extension (about a minute)."""
    from torch.utils import cpp_extension

    include = _cuda_include_dir()
    if include is None or shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler and the CUDA headers to build the emulated glue")
    build = tmp_path_factory.mktemp("cuda_glue_emu")
    cuda_dir = ROOT / "csrc" / "cuda"
    sources = [str(cuda_dir / "ops.cpp")]
    for cu in sorted(cuda_dir.glob("*.cu")):  # each kernel file as its own C++ translation unit
        wrapper = build / f"{cu.stem}_emu.cpp"
        wrapper.write_text(f'#include "{cuda_dir / "test" / "emu" / "cuda_emu.h"}"\n#include "{cu}"\n')
        sources.append(str(wrapper))
    library = torch.library.Library("fastlars_emu", "DEF")
    for schema in OP_SCHEMAS:
        library.define(schema)
    cpp_extension.load(
        name="fastlars_cuda_glue_emu", sources=sources, build_directory=str(build), is_python_module=False,
        extra_cflags=["-O1", "-U_FORTIFY_SOURCE", "-DFASTLARS_CUDA_EMULATION", f"-I{cuda_dir}", f"-I{include}"],
    )
    yield OpsBackend("fastlars_emu")
    del library


@pytest.fixture
def glue_native(emulated_glue, monkeypatch):
    """backend="native" on the CPU goes through ops.cpp and the emulated kernels for this test."""
    emulated_glue.calls = 0
    monkeypatch.setitem(backends._LOADED, "native", emulated_glue)
    return emulated_glue


def test_op_schemas_match_fastlars_ops() -> None:
    """The contract ops.cpp implements is the one fastlars._ops defines."""
    import fastlars._ops  # noqa: F401
    for schema in OP_SCHEMAS:
        name = schema.split("(", 1)[0]
        assert hasattr(torch.ops.fastlars, name), f"fastlars._ops defines no fastlars::{name}"
        assert str(getattr(torch.ops.fastlars, name).default._schema) == f"fastlars::{schema}"


@pytest.mark.parametrize("cls,base_lr,options", [
    (fastlars.LARS, 1.0, {"weight_decay": 1e-2, "trust_ratio_bounds": (0.01, 10.0), "nesterov": True}),
    (fastlars.LARS, 1.0, {"weight_decay": 0.0}),
    (fastlars.LAMB, 0.01, {"max_grad_norm": 1.0, "decoupled_decay": True}),
    (fastlars.LAMB, 0.01, {"trust_clip": True}),
], ids=["lars", "lars-noadapt", "lamb-clip", "lamb-trustclip"])
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16+m"])
def test_emulated_glue_matches_reference(glue_native, cls, base_lr, options, dtype, master) -> None:
    ref, emu = _emu_pair(cls, options, dtype=dtype, master=master, base_lr=base_lr, steps=5)
    assert glue_native.calls > 0
    assert_same_trajectory(ref, emu, dtype)


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_emulated_glue_mixed_dtypes_and_tensor_lr(glue_native, cls, base_lr) -> None:
    ref = _mixed_dtype_run(cls, base_lr, "reference", "cpu", steps=4)
    emu = _mixed_dtype_run(cls, base_lr, "native", "cpu", steps=4)
    assert_same_trajectory(ref, emu, torch.bfloat16)

    def make(backend):
        return lambda params: cls(params, lr=torch.tensor(base_lr), weight_decay=1e-2, backend=backend)

    ref = run_trajectory(make("reference"), shapes=EMU_SHAPES, steps=4, base_lr=base_lr)
    emu = run_trajectory(make("native"), shapes=EMU_SHAPES, steps=4, base_lr=base_lr)
    assert_same_trajectory(ref, emu, torch.float32)


@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_emulated_glue_records_the_reference_trust_ratios(glue_native, cls, base_lr) -> None:
    """ops.cpp's trust_ratios output: the kernels' ratios (1 in a group that does not adapt), left
    alone by a skipped step."""
    def make(backend):
        def build(params):
            opt = cls([{"params": params[1:]}, {"params": params[:1], "weight_decay": 0.0}], lr=base_lr,
                      weight_decay=1e-2, backend=backend)
            opt.record_trust_ratios()
            return opt
        return build

    def poison(t, grads):
        if t == 4:
            grads[4].view(-1)[0] = float("nan")

    ref = run_trajectory(make("reference"), shapes=EMU_SHAPES, steps=4, base_lr=base_lr, grad_hook=poison)[1]
    emu = run_trajectory(make("native"), shapes=EMU_SHAPES, steps=4, base_lr=base_lr, grad_hook=poison)[1]
    assert glue_native.calls > 0 and emu.skipped_steps == 1
    torch.testing.assert_close(emu.trust_ratios[0], ref.trust_ratios[0], rtol=1e-6, atol=0)
    assert not torch.equal(emu.trust_ratios[0], torch.ones_like(emu.trust_ratios[0]))
    assert torch.equal(emu.trust_ratios[1], torch.ones(1))


def test_emulated_glue_rejects_bad_tensors_by_name(emulated_glue) -> None:
    ops = torch.ops.fastlars_emu
    w, g, v = torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)
    norms = torch.ones(1)
    args = (0.1, None, 0.9, 0.0, 1e-3, 0.0, False, False, True, True, None, False, None, None)
    with pytest.raises(RuntimeError, match=r"grads\[0\]: shape"):
        ops.lars_step_([w], [torch.zeros(4)], [v], [], norms, *args)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\]: dtype"):
        ops.lars_step_([w], [g], [v.double()], [], norms, *args)
    with pytest.raises(RuntimeError, match=r"params\[0\]: dtype"):
        ops.lars_step_([w.double()], [g.double()], [v.double()], [], norms, *args)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\]: strides"):
        ops.lars_step_([w], [g], [v.t()], [], norms, *args)
    with pytest.raises(RuntimeError, match=r"grad_norms"):
        ops.lars_step_([w], [g], [v], [], torch.ones(2), *args)
    with pytest.raises(RuntimeError, match=r"trust_ratio_bounds"):
        ops.lars_step_([w], [g], [v], [], norms, *args[:10], [2.0, 1.0], *args[11:])
    with pytest.raises(RuntimeError, match=r"found_inf"):
        ops.lars_step_([w], [g], [v], [], norms, *args[:-1], torch.zeros(2))


@pytest.mark.parametrize("plan", ["wave", "onepass"])
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_emulated_glue_follows_either_launch_plan(glue_native, monkeypatch, plan, cls, base_lr) -> None:
    """FASTLARS_CUDA_PLAN (csrc/cuda/launch_plan.h) changes only how tensors are grouped into launches."""
    monkeypatch.setenv("FASTLARS_CUDA_PLAN", plan)
    ref, emu = _emu_pair(cls, {"weight_decay": 1e-2}, base_lr=base_lr, steps=3)
    assert glue_native.calls > 0
    assert_same_trajectory(ref, emu, torch.float32)


def test_emulated_glue_rejects_an_unknown_launch_plan(emulated_glue, monkeypatch) -> None:
    w, g, v = torch.ones(4, 4), torch.ones(4, 4), torch.zeros(4, 4)
    args = (0.1, None, 0.9, 0.0, 1e-3, 0.0, False, False, True, True, None, False, None, None)
    monkeypatch.setenv("FASTLARS_CUDA_PLAN", "fast")
    with pytest.raises(RuntimeError, match="FASTLARS_CUDA_PLAN: expected 'wave' or 'onepass', got 'fast'"):
        torch.ops.fastlars_emu.lars_step_([w], [g], [v], [], torch.ones(1), *args)
    assert torch.equal(w, torch.ones(4, 4)) and torch.equal(v, torch.zeros(4, 4))  # nothing written


# --------------------------------------------------------------------------- trajectories
@pytest.mark.cuda
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=str)
def test_lars_options_match_reference(native_cuda, options) -> None:
    ref = _trajectory(fastlars.LARS, options, "reference")
    nat = _trajectory(fastlars.LARS, options, "native")
    assert_same_trajectory(ref, nat, torch.float32)
    assert_state_tight(ref, nat)


@pytest.mark.cuda
@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=str)
def test_lamb_options_match_reference(native_cuda, options) -> None:
    ref = _trajectory(fastlars.LAMB, options, "reference", base_lr=0.01)
    nat = _trajectory(fastlars.LAMB, options, "native", base_lr=0.01)
    assert_same_trajectory(ref, nat, torch.float32)
    assert_state_tight(ref, nat)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,master", STORAGE, ids=str)
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_dtypes_and_master_weights_match_reference(native_cuda, cls, base_lr, dtype, master) -> None:
    options = {"weight_decay": 1e-2}
    ref = _trajectory(cls, options, "reference", dtype=dtype, master=master, base_lr=base_lr)
    nat = _trajectory(cls, options, "native", dtype=dtype, master=master, base_lr=base_lr)
    assert_same_trajectory(ref, nat, dtype)


def _mixed_dtype_run(cls, base_lr, backend, device, steps=30):
    """One group of fp32 and bf16 params with master weights: two dtype buckets in one call."""
    params = make_params([(33, 17), (1031,), (0,), (5, 5), (16_390,)], torch.float32, device)
    for i in (1, 4):
        params[i] = params[i].detach().to(torch.bfloat16).requires_grad_(True)
    opt = cls(params, lr=base_lr, weight_decay=1e-2, master_weights=True, backend=backend)
    for t in range(1, steps + 1):
        opt.param_groups[0]["lr"] = lr_at(t, base_lr)
        for p, g in zip(params, synthetic_grads(params, t)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.cuda
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_mixed_dtypes_in_one_group(native_cuda, cls, base_lr) -> None:
    ref = _mixed_dtype_run(cls, base_lr, "reference", "cuda")
    nat = _mixed_dtype_run(cls, base_lr, "native", "cuda")
    assert_same_trajectory(ref, nat, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_more_tensors_than_one_launch_holds(native_cuda, cls, base_lr) -> None:
    """1500 tensors (a table holds about 540), empty ones scattered and last: several launches per wave.
    4 steps, not 30: the reference's per-tensor loop over 1500 tensors took 26-38 s for 30 on an H200 (about
    1.3 s a step), and the tests stage (150 s) also runs the low-precision suites now; from step 2 on every
    launch reads the state the previous one wrote."""
    shapes = [(0,) if i % 97 == 0 else (1 + (i * 37) % 300,) for i in range(1500)] + [(0,)]
    ref = _trajectory(cls, {"weight_decay": 1e-2}, "reference", shapes=shapes, base_lr=base_lr, steps=4)
    nat = _trajectory(cls, {"weight_decay": 1e-2}, "native", shapes=shapes, base_lr=base_lr, steps=4)
    assert_same_trajectory(ref, nat, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("plan,wave_bytes", [("wave", "1"), ("wave", "4096"), ("wave", "0"), ("wave", ""),
                                             ("onepass", "")])
@pytest.mark.parametrize("cls,base_lr", ALGOS, ids=["lars", "lamb"])
def test_wave_sizes_match_reference(native_cuda, monkeypatch, plan, wave_bytes, cls, base_lr) -> None:
    """FASTLARS_CUDA_WAVE_BYTES: one tensor per wave, small waves, one wave per table; then the two plans of
    FASTLARS_CUDA_PLAN with their own budgets (half the L2; none)."""
    monkeypatch.setenv("FASTLARS_CUDA_PLAN", plan)
    monkeypatch.setenv("FASTLARS_CUDA_WAVE_BYTES", wave_bytes)
    ref = _trajectory(cls, {"weight_decay": 1e-2}, "reference", base_lr=base_lr)
    nat = _trajectory(cls, {"weight_decay": 1e-2}, "native", base_lr=base_lr)
    assert_same_trajectory(ref, nat, torch.float32)


# ---------------------------------------------------------------------------- op contract
def _op_samples() -> dict[str, tuple]:
    """Arguments for each fastlars op, in the schema order csrc/cuda/ops.cpp implements."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensors(dtype=torch.float32):
        return [torch.randn(n, device="cuda", generator=gen).to(dtype) for n in (5, 0, 16_390)]

    params, grads = tensors(), tensors()
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    steps = [torch.ones((), device="cuda") for _ in params]
    found_inf = torch.zeros(1, device="cuda")
    return {
        "grad_norms": (grads, torch.tensor(2.0, device="cuda")),
        "lars_step_": (params, grads, tensors(), [], norms, 0.1, None, 0.9, 1e-4, 1e-3, 0.0, False, False, True, True,
                       None, False, None, found_inf),
        "lamb_step_": (tensors(), grads, tensors(), [t.abs() for t in tensors()], [], steps, 1e-3,
                       torch.tensor(1e-3, device="cuda"), 0.9, 0.999, 1e-6, 0.01, True, True, False, False, True,
                       [0.01, 10.0], False, None, None, found_inf),
    }


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["grad_norms", "lars_step_", "lamb_step_"])
def test_opcheck(native_cuda, name) -> None:
    """torch.library.opcheck: schema (mutations declared), fake tensor and dispatch of the CUDA kernels."""
    import fastlars._ops  # noqa: F401  (defines the schemas and fake kernels)

    assert hasattr(torch.ops.fastlars, name), f"fastlars._ops defines no fastlars::{name}"
    torch.library.opcheck(getattr(torch.ops.fastlars, name).default, _op_samples()[name])


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


@pytest.mark.cuda
@pytest.mark.parametrize("cls,kw", [(fastlars.LARS, {"lr": 1.0, "weight_decay": 1e-2, "trust_clip": True}),
                                    (fastlars.LAMB, {"lr": 0.01, "max_grad_norm": 1.0})], ids=["lars", "lamb"])
def test_step_never_synchronizes_with_the_host(native_cuda, cls, kw) -> None:
    params = make_params(SHAPES, torch.bfloat16, "cuda")
    opt = cls(params, backend="native", master_weights=True, **kw)
    for p, g in zip(params, synthetic_grads(params, 1)):
        p.grad = g
    opt.step()  # state creation may allocate; the steps after it are checked
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
