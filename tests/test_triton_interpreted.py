"""The Triton kernels on CPU tensors under the Triton interpreter, against the reference backend.

This module needs TRITON_INTERPRET=1 set before triton is imported, which changes triton for the whole
process; so the main suite runs it in a subprocess (tests/test_triton_backend.py::test_interpreted_suite)
and skips it, with that reason, when it is collected in a process without the interpreter.

Covered: every LARS/LAMB option for 30 steps with a changing lr over empty, one-element, odd and
multi-chunk tensors (params and state compared, fp32 state within harness.STATE_RTOL); fp16/bf16 params
with and without fp32 master weights; fp32 and bf16 params mixed in one group (two dtype buckets);
unaligned views (a bucket of their own); a tensor lr read in the kernels; non-finite gradients
skipping the whole step; grad_scale unscaling and found_inf skipping in the kernels;
deterministic norms; channels_last params; clear errors; torch.library.opcheck of the three ops; the
ops inside a torch.compile(fullgraph=True) graph; every write bumps autograd's version counters.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastlars
from fastlars import backends, functional
from harness import (
    assert_close,
    assert_same_trajectory,
    assert_state_tight,
    make_params,
    run_trajectory,
    synthetic_grads,
)

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in its own process with TRITON_INTERPRET=1 (test_triton_backend.py::test_interpreted_suite)",
                allow_module_level=True)

import test_autograd_versions as av

from fastlars.backends.triton import ops as triton_ops
from fastlars.backends.triton import tables

# Empty, one element, 2-D odd, and tensors spanning two and three chunks (the last one ragged).
SHAPES = [(0,), (1,), (3, 5), (triton_ops.CHUNK + 1,), (2 * triton_ops.CHUNK + 7,)]
STEPS = 30

# Every option at least once; the interpreter is slow, so options that touch different code share a run.
LARS_OPTIONS = [
    {"weight_decay": 1e-2},
    {"weight_decay": 1e-2, "momentum_style": "torch", "nesterov": True, "trust_ratio_bounds": (0.01, 10.0)},
    {"weight_decay": 1e-2, "nesterov": True, "trust_clip": True, "eps": 1e-8},
    {"weight_decay": 1e-2, "momentum_style": "torch", "trust_clip": True},
    {"weight_decay": 0.0},  # adapt defaults to False: ratio 1, no norm pass
    {"weight_decay": 0.0, "adapt": True, "maximize": True},
]
LAMB_OPTIONS = [
    {},
    {"bias_correction": False, "grad_averaging": False},
    {"decoupled_decay": True, "trust_clip": True, "trust_ratio_bounds": (0.01, 10.0)},
    {"max_grad_norm": 1.0},
    {"weight_decay": 0.0},  # adapt defaults to False: the single-pass path
    {"weight_decay": 0.0, "adapt": True, "maximize": True},
]
ALGOS = [(fastlars.LARS, 1.0, {"weight_decay": 1e-2}), (fastlars.LAMB, 0.01, {})]


def _trajectory(cls, options, backend, dtype=torch.float32, master=False, shapes=SHAPES, base_lr=1.0, **kw):
    def make(params):
        return cls(params, lr=base_lr, backend=backend, master_weights=master, **options)

    return run_trajectory(make, shapes=shapes, dtype=dtype, steps=STEPS, base_lr=base_lr, **kw)


def test_the_interpreter_is_active() -> None:
    assert triton_ops.INTERPRETED
    assert backends.unavailable_reason("triton", torch.device("cpu")) is None


@pytest.mark.parametrize("options", LARS_OPTIONS, ids=str)
def test_lars_options_match_reference(options) -> None:
    ref = _trajectory(fastlars.LARS, options, "reference")
    tri = _trajectory(fastlars.LARS, options, "triton")
    assert_same_trajectory(ref, tri, torch.float32)
    assert_state_tight(ref, tri)


@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=str)
def test_lamb_options_match_reference(options) -> None:
    ref = _trajectory(fastlars.LAMB, options, "reference", base_lr=0.01)
    tri = _trajectory(fastlars.LAMB, options, "triton", base_lr=0.01)
    assert_same_trajectory(ref, tri, torch.float32)
    assert_state_tight(ref, tri)


@pytest.mark.parametrize("cls,base_lr,options,dtype,master", [
    (fastlars.LARS, 1.0, {"weight_decay": 1e-2}, torch.bfloat16, True),
    (fastlars.LAMB, 0.01, {}, torch.bfloat16, True),
    (fastlars.LAMB, 0.01, {}, torch.float16, False),
    (fastlars.LAMB, 0.01, {}, torch.bfloat16, False),
], ids=lambda v: str(v).replace("torch.", ""))
def test_low_precision_storage_matches_reference(cls, base_lr, options, dtype, master) -> None:
    """Moments kept in bf16/fp16 (no masters) make LAMB take its recompute-in-pass-2 path."""
    ref = _trajectory(cls, options, "reference", dtype, master, base_lr=base_lr)
    tri = _trajectory(cls, options, "triton", dtype, master, base_lr=base_lr)
    assert_same_trajectory(ref, tri, dtype)


def test_mixed_dtypes_in_one_group_use_one_bucket_each() -> None:
    def run(backend):
        params = make_params(SHAPES, torch.float32)
        params = [p if i % 2 else p.detach().bfloat16().requires_grad_(True) for i, p in enumerate(params)]
        opt = fastlars.LAMB(params, lr=0.01, backend=backend)
        for t in range(1, STEPS + 1):
            for p, g in zip(params, synthetic_grads(params, t)):
                p.grad = g
            opt.step()
        return params, opt

    ref, tri = run("reference"), run("triton")
    assert_same_trajectory(ref, tri, torch.bfloat16)


@pytest.mark.parametrize("cls,base_lr,options", ALGOS, ids=["lars", "lamb"])
def test_unaligned_views_get_a_bucket_of_their_own(cls, base_lr, options) -> None:
    """Params that are views 4 bytes into a buffer (not 16-byte aligned) go to an unaligned bucket (scalar
    accesses, no alignment promised to the compiler) and still match the reference."""

    def run(backend):
        gen = torch.Generator().manual_seed(0)
        params = []
        for i, shape in enumerate(SHAPES):
            value = torch.randn(shape, generator=gen) * 0.5
            if i % 2:  # odd entries: a view one fp32 element into a larger buffer
                value = torch.cat([torch.zeros(1), value.reshape(-1)])[1:].reshape(shape)
            params.append(torch.nn.Parameter(value))
        opt = cls(params, lr=base_lr, backend=backend, **options)
        for t in range(1, 6):
            for p, g in zip(params, synthetic_grads(params, t)):
                p.grad = g
            opt.step()
        return params, opt

    ref, tri = run("reference"), run("triton")
    assert_same_trajectory(ref, tri, torch.float32)
    params = tri[0]
    flags = {b.aligned: b.index.tolist() for b in tables.buckets([params], triton_ops.CHUNK)}
    unaligned = [i for i, p in enumerate(params) if p.data_ptr() % tables.ALIGNMENT]
    assert unaligned and flags[False] == unaligned and set(flags[True]).isdisjoint(unaligned)


@pytest.mark.parametrize("cls,base_lr,options", [
    (fastlars.LARS, 1.0, {"weight_decay": 1e-2, "trust_clip": True}),
    (fastlars.LAMB, 0.01, {"max_grad_norm": 1.0}),
], ids=["lars", "lamb"])
def test_tensor_lr_is_read_in_the_kernels(cls, base_lr, options) -> None:
    def make(backend):
        return lambda params: cls(params, lr=torch.tensor(base_lr), capturable=True, backend=backend, **options)

    ref = run_trajectory(make("reference"), shapes=SHAPES, steps=STEPS, base_lr=base_lr)
    tri = run_trajectory(make("triton"), shapes=SHAPES, steps=STEPS, base_lr=base_lr)
    assert_same_trajectory(ref, tri, torch.float32)


@pytest.mark.parametrize("cls,base_lr,options", ALGOS, ids=["lars", "lamb"])
def test_nonfinite_gradient_skips_the_whole_step(cls, base_lr, options) -> None:
    def hook(step, grads):
        if step in (4, 9):
            grads[3].view(-1)[3] = float("nan") if step == 4 else float("inf")

    ref = _trajectory(cls, options, "reference", base_lr=base_lr, grad_hook=hook)
    tri = _trajectory(cls, options, "triton", base_lr=base_lr, grad_hook=hook)
    assert_same_trajectory(ref, tri, torch.float32)
    assert tri[1].skipped_steps == 2


@pytest.mark.parametrize("cls,base_lr,options", [
    *[(fastlars.LARS, 1.0, LARS_OPTIONS[i]) for i in (1, 3, 4)],
    *[(fastlars.LAMB, 0.01, LAMB_OPTIONS[i]) for i in (0, 2, 4)],
], ids=["lars-bounds", "lars-clip", "lars-noadapt", "lamb", "lamb-decoupled-bounds", "lamb-noadapt"])
def test_recorded_trust_ratios_match_reference(cls, base_lr, options) -> None:
    """record_trust_ratios(): the ratios from the kernels' per-tensor sums, kept over a skipped step."""
    def make(backend):
        def build(params):
            opt = cls(params, lr=base_lr, backend=backend, **options)
            opt.record_trust_ratios()
            return opt
        return build

    def hook(step, grads):
        if step == 5:
            grads[3].view(-1)[3] = float("nan")

    ref = run_trajectory(make("reference"), shapes=SHAPES, steps=5, base_lr=base_lr, grad_hook=hook)[1]
    tri = run_trajectory(make("triton"), shapes=SHAPES, steps=5, base_lr=base_lr, grad_hook=hook)[1]
    assert tri.skipped_steps == 1
    torch.testing.assert_close(tri.trust_ratios[0], ref.trust_ratios[0], rtol=1e-6, atol=0)


def _lamb_call(backend, params, grads, state, **kw):
    exp_avgs, exp_avg_sqs, steps = state
    functional.lamb_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=0.01, backend=backend, **kw)


@pytest.mark.parametrize("found", [0.0, 1.0], ids=["no-overflow", "overflow"])
def test_grad_scale_unscales_and_found_inf_skips_in_kernels(found) -> None:
    """The GradScaler hand-off: grads scaled by 1024, unscaled in the kernels; found_inf=1 writes nothing."""
    scale = torch.tensor(1024.0)
    flag = torch.tensor(found)
    results = {}
    for backend in ("reference", "triton"):
        params = [p.detach() for p in make_params(SHAPES, torch.float32)]
        grads = [g * 1024.0 for g in synthetic_grads(params, 1)]
        state = ([torch.full_like(p, 0.01) for p in params], [torch.full_like(p, 0.02) for p in params],
                 [torch.tensor(3.0) for _ in params])
        norms = backends.load(backend).grad_norms(grads, scale)
        _lamb_call(backend, params, grads, state, grad_scale=scale, found_inf=flag, max_grad_norm=1.0,
                   global_grad_norm=functional.global_norm([norms]))
        lars_params = [p.clone() for p in params]
        buffers = [torch.full_like(p, 0.1) for p in params]
        functional.lars_step(lars_params, grads, buffers, lr=0.5, weight_decay=1e-2, grad_norms=norms,
                             grad_scale=scale, found_inf=flag, backend=backend)
        results[backend] = params + state[0] + state[1] + lars_params + buffers
    for expected, actual in zip(results["reference"], results["triton"]):
        assert_close(actual, expected, torch.float32, f"found_inf={found}")
    if found:
        initial = make_params(SHAPES, torch.float32)
        for p, p0 in zip(results["triton"], initial):
            assert torch.equal(p, p0.detach())


def test_every_launch_turns_off_fp_fusion(monkeypatch) -> None:
    """Every kernel launch of a LARS and a LAMB step (norms, both passes, unscaling) passes
    enable_fp_fusion=False: compiled for a GPU, a*b + c would otherwise become one fma and the
    trajectory leave the reference's rounding (the interpreter ignores the option, so only the launch
    arguments can show it here; the sm_90 PTX test checks what it compiles to)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, kwargs.get("enable_fp_fusion")))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    for cls, base_lr, options in ALGOS:
        params = make_params(SHAPES, torch.float32)
        opt = cls(params, lr=base_lr, backend="triton", **options)
        for p, g in zip(params, synthetic_grads(params, 1)):
            p.grad = g
        opt.step()
    kernels = {name for name, _ in launches}
    assert {"sumsq_partials_kernel", "sum_chunks_kernel", "lars_update_kernel", "lamb_kernel"} <= kernels
    assert [(name, fusion) for name, fusion in launches if fusion is not False] == []


def test_grad_norms_are_deterministic_and_accurate() -> None:
    impl = backends.load("triton")
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in (0, 1, 7, 1031, 5 * triton_ops.CHUNK + 5)]
    grads += [torch.randn(4099, generator=gen).to(torch.bfloat16), torch.randn(33, generator=gen).half(),
              torch.zeros(5)]
    scale = torch.tensor(256.0)
    first = impl.grad_norms(grads, scale)
    assert torch.equal(impl.grad_norms(grads, scale), first)
    expected = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).float() / 256.0
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=0.0)
    assert first[0].item() == 0.0 and first[-1].item() == 0.0
    torch.testing.assert_close(impl.grad_norms(grads, None), expected * 256.0, rtol=1e-6, atol=0.0)


def test_channels_last_params_match_reference() -> None:
    def run(backend):
        params = [torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(i))
                  .to(memory_format=torch.channels_last).requires_grad_(True) for i in range(2)]
        opt = fastlars.LARS(params, lr=1.0, weight_decay=1e-2, backend=backend)
        for t in range(1, 4):
            for p, g in zip(params, synthetic_grads(params, t)):
                p.grad = g.contiguous(memory_format=torch.channels_last)
            opt.step()
        return params, opt

    assert_same_trajectory(run("reference"), run("triton"), torch.float32)


def test_bad_tensors_raise_clear_errors() -> None:
    impl = backends.load("triton")
    with pytest.raises(ValueError, match="not dense"):
        impl.grad_norms([torch.randn(8, 6)[:, ::2]], None)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        impl.grad_norms([torch.ones(4, dtype=torch.float64)], None)
    p = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="strides"):
        functional.lars_step([p], [torch.ones(4, 4).t()], [torch.zeros(4, 4)], lr=0.1, backend="triton")


def test_layouts_are_checked_once_per_shape_stride_and_device(monkeypatch) -> None:
    """A step over the tensors of the last one checks no layout again (~10 µs an entry in Python: 4 ms a step
    for BERT-Large's 391 entries of 4 tensors); a new layout is checked, and a bad one still raises."""
    calls = []
    check = tables._check_layout
    monkeypatch.setattr(tables, "_check_layout", lambda entry, where: (calls.append(where), check(entry, where)))
    monkeypatch.setattr(tables, "_checked_layouts", set())
    p, g = torch.zeros(4, 6), torch.ones(4, 6)
    tables.buckets([[p], [g]], triton_ops.CHUNK)
    tables.buckets([[p], [torch.ones(4, 6)]], triton_ops.CHUNK)  # another tensor of the same layout
    assert calls == [0]
    with pytest.raises(ValueError, match="strides"):
        tables.buckets([[p], [torch.ones(6, 4).t()]], triton_ops.CHUNK)
    with pytest.raises(ValueError, match="strides"):  # refused again: a failed layout is never remembered
        tables.buckets([[p], [torch.ones(6, 4).t()]], triton_ops.CHUNK)
    assert calls == [0, 0, 0]


def _op_samples():
    params = [p.detach() for p in make_params([(0,), (5,), (3, 4)], torch.float32)]
    grads = synthetic_grads(params, 1)
    like = [torch.zeros_like(p) for p in params]
    norms = torch.stack([g.norm() for g in grads])
    return {
        "grad_norms": (grads, torch.tensor(2.0)),
        "lars_step_": (params, grads, like, [], norms, 0.1, None, 0.9, 1e-2, 1e-3, 0.0, False, False, True, True,
                       None, False, None, torch.tensor(0.0)),
        "lamb_step_": (params, grads, like, [torch.zeros_like(p) for p in params], [], [torch.tensor(1.0)] * 3,
                       0.01, torch.tensor(0.01), 0.9, 0.999, 1e-6, 1e-2, True, True, False, False, True, None,
                       False, None, None, None),
    }


@pytest.mark.parametrize("name", ["grad_norms", "lars_step_", "lamb_step_"])
def test_opcheck(name) -> None:
    """Schema (mutations declared), fake kernel and dispatch of fastlars::triton_<name>."""
    op = getattr(torch.ops.fastlars, triton_ops.PREFIX + name).default
    torch.library.opcheck(op, _op_samples()[name])


@pytest.mark.parametrize("cls,base_lr", [(fastlars.LARS, 1.0), (fastlars.LAMB, 0.01)], ids=["lars", "lamb"])
def test_compiled_step_fullgraph(cls, base_lr) -> None:
    """The ops are single nodes of a full graph (aot_eager: the graph is traced, the kernels run as is)."""
    torch._dynamo.reset()
    eager = make_params(SHAPES, torch.float32)
    params = make_params(SHAPES, torch.float32)
    eager_opt = cls(eager, lr=base_lr, weight_decay=1e-2, backend="triton")
    opt = cls(params, lr=base_lr, weight_decay=1e-2, backend="triton")
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for t in range(1, 4):
        for p, q, g in zip(params, eager, synthetic_grads(params, t)):
            p.grad, q.grad = g, g.clone()
        step()
        eager_opt.step()
    assert_same_trajectory((eager, eager_opt), (params, opt), torch.float32)


@pytest.mark.parametrize("cls,kw,dtype", av.CONFIGS)
def test_every_step_bumps_what_it_writes(cls, kw, dtype) -> None:
    """The kernels' writes (fp32 and low-precision state) reach autograd's version counters, as torch's
    in-place ops' do (tests/test_autograd_versions.py runs the other backends)."""
    av.steps_bump_every_written_tensor(cls, kw, dtype, "cpu", "triton", True)


@pytest.mark.parametrize("cls,kw", [(fastlars.LARS, {"lr": 0.1}),
                                    (fastlars.LAMB, {"lr": 0.01, "state_dtype": "int8", "min_quantized_size": 0})],
                         ids=["lars", "lamb-int8"])
def test_backward_through_weights_a_step_overwrote_raises(cls, kw) -> None:
    av.backward_after_a_step_raises(cls, kw, "cpu", "triton", True)
