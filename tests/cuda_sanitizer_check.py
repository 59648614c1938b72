"""A short workload of every native CUDA kernel, to run under NVIDIA compute-sanitizer (GPU only).

    for tool in memcheck racecheck synccheck initcheck; do
        compute-sanitizer --tool $tool --error-exitcode 1 --target-processes all \\
            .venv/bin/python tests/cuda_sanitizer_check.py || exit 1
    done

It drives fastlars.LARS and fastlars.LAMB with backend="native" through: fp32, bf16 and fp16
params with and without fp32 master weights; empty tensors first, in the middle and last; sizes
that are not multiples of the vector width; misaligned views (offset storage, so the scalar
path runs); more tensors than one kernel-argument table holds; many small waves; every option;
a skipped (non-finite) step and a GradScaler-style scaled step. It exits non-zero when the native
backend (and its low-precision kernels) is not usable on CUDA, so a sanitizer run can never pass by
testing nothing.

The low-precision kernels (csrc/cuda/lowbit.cu) run through the same optimizers with
state_dtype="int8" and "bf16": fp32 params, bf16 params with fp32 masters, bf16 params written by
stochastic rounding (master_weights=False), fp16 params with masters; ragged last blocks (257
elements: a block of 1; rows of 300: blocks of 256 and 44); a tensor below min_quantized_size (fp32
state beside int8 state in one call) and an empty one; a row longer than a kernel chunk
((3, 20000)); every option set; a step skipped on device (found_inf) by a non-finite gradient; and,
in the full workload, int8 state on every tensor including the empty ones (min_quantized_size=0)
and LAMB without adapt on stochastically rounded bf16 params (its fused one-pass kernel; a group
that does not adapt keeps fp32 state).

`--quick` (racecheck, which ran past 30 s on the full workload on an H200): the first option set per
algorithm and fp32 / bf16 + fp32 master storage only, without the 1300-tensor case (under racecheck its
~4000 small torch launches alone outran 50 s there); every kernel still runs, with aligned and
misaligned views, empty tensors and a skipped step (the block reductions racecheck watches are the same
code for every option, dtype and table count). Its low-precision part: 3 storages per algorithm (int8
state with fp32 params, int8 state with stochastically rounded bf16 params, bf16 state with bf16 params
and masters; min_quantized_size splitting int8 from fp32 state), 4 tensors, 2 steps each (the second
skipped on the device): every low-precision kernel but LAMB's fused no-adapt pass (the same warp and block
reductions as pass 1); about 660 small torch operations (on the CPU, Python step path, views left out)
beside the 1,060 of the rest of --quick. The full workload's low-precision part: about 4,300 beside 24,800.

`--device cpu` runs the same workload on the CPU's native kernels (no sanitizer involved): a check, on a
machine without a GPU, that the workload builds and steps; `--count-ops` prints how many ATen operations each
part issues, a measure of its small launches on a GPU (views included; a native step op counts once here but
launches 1-3 kernels per kernel-argument table there).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlars
from fastlars import backends

SHAPES = [(0,), (5,), (0,), (1031,), (16_384,), (16_389,), (33, 17), (0,)]
LARS_OPTIONS = [{"weight_decay": 1e-2}, {"weight_decay": 1e-2, "momentum_style": "torch", "nesterov": True},
                {"weight_decay": 1e-2, "trust_clip": True, "trust_ratio_bounds": (0.01, 10.0)}, {"weight_decay": 0.0}]
LAMB_OPTIONS = [{}, {"decoupled_decay": True, "max_grad_norm": 1.0}, {"bias_correction": False,
                "grad_averaging": False, "trust_clip": True}, {"weight_decay": 0.0}]
STORAGE = [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)]

LOWBIT_SHAPES = [(0,), (257,), (5, 300), (100,)]
"""Low-precision runs: an empty tensor, ragged last blocks (257 = 256 + 1; rows of 300 = 256 + 44) in int8 state,
and (100,) below MIN_QUANTIZED (fp32 state in the same call), which takes the non-finite gradient of step 2."""
LOWBIT_FULL_SHAPES = [*LOWBIT_SHAPES, (4097,), (3, 20_000), (0, 5)]
"""The full workload adds a ragged 1-D tensor, rows longer than a kernel chunk (16,384) and an empty 2-D one."""
MIN_QUANTIZED = 256
LOWBIT_STORAGE = [  # (param dtype, fp32 masters, optimizer options); the first three are --quick's
    (torch.float32, False, {"state_dtype": "int8"}),
    (torch.bfloat16, False, {"state_dtype": "int8", "stochastic_rounding": True, "rounding_seed": 7}),
    (torch.bfloat16, True, {"state_dtype": "bf16"}),
    (torch.bfloat16, True, {"state_dtype": "int8"}),
    (torch.float32, False, {"state_dtype": "bf16"}),
    (torch.bfloat16, False, {"state_dtype": "bf16", "stochastic_rounding": True}),
    (torch.float16, True, {"state_dtype": "int8"}),
    (torch.float32, False, {"state_dtype": "int8", "min_quantized_size": 0}),  # every tensor int8, empty ones too
]
QUICK_LOWBIT_STORAGE = 3
LOWBIT_QUICK_STEPS = 2
"""--quick's low-precision runs: a step that creates and updates the state, then one skipped on the device."""

DEVICE = torch.device("cuda")


def _params(shapes, dtype, misaligned: bool) -> list[torch.Tensor]:
    out = []
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        if misaligned:  # a view one element into its storage: 4-element vectors are not aligned
            base = torch.randn(n + 1, device=DEVICE).to(dtype)
            t = base[1:].view(shape)
        else:
            t = torch.randn(shape, device=DEVICE).to(dtype)
        out.append(t.requires_grad_(True))
    return out


def _run(cls, options, dtype, master, shapes, misaligned, steps=3) -> None:
    params = _params(shapes, dtype, misaligned)
    opt = cls(params, lr=0.1, master_weights=master, backend="native", **options)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        if t == 1 and params[3].numel():
            params[3].grad.view(-1)[0] = float("inf")  # a skipped step
        opt.step()
    _synchronize()


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def lowbit_runs(quick: bool) -> list[tuple[type, dict, torch.dtype, bool, list, bool]]:
    """(optimizer class, options, param dtype, masters, shapes, misaligned) of every low-precision run: each
    storage with the first option set of each algorithm, aligned (the first QUICK_LOWBIT_STORAGE storages with
    --quick); in the full workload also misaligned views for those first storages (the kernels access one
    element per lane, so an offset view takes no other path), the other option sets with int8 state and fp32
    params, and LAMB without adapt on stochastically rounded bf16 params (the fused pass)."""
    runs = []
    storage = LOWBIT_STORAGE[:QUICK_LOWBIT_STORAGE] if quick else LOWBIT_STORAGE
    shapes = LOWBIT_SHAPES if quick else LOWBIT_FULL_SHAPES
    for cls, grid in ((fastlars.LARS, LARS_OPTIONS), (fastlars.LAMB, LAMB_OPTIONS)):
        for k, (dtype, master, storage_options) in enumerate(storage):
            options = {"min_quantized_size": MIN_QUANTIZED, **grid[0], **storage_options}
            for misaligned in (False, True) if not quick and k < QUICK_LOWBIT_STORAGE else (False,):
                runs.append((cls, options, dtype, master, shapes, misaligned))
        if not quick:
            for options in grid[1:]:
                runs.append((cls, {"min_quantized_size": MIN_QUANTIZED, **options, **LOWBIT_STORAGE[0][2]},
                             torch.float32, False, shapes, False))
    if not quick:  # a group that does not adapt keeps fp32 state; stochastic rounding takes it to lowbit.cu
        runs.append((fastlars.LAMB, {"adapt": False, **LOWBIT_STORAGE[1][2]}, torch.bfloat16, False, shapes, False))
    return runs


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations issued (views and metadata queries included, so an upper bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _part(name: str, counts: Counter | None) -> Iterator[None]:
    if counts is None:
        yield
        return
    with _OpCounter() as counter:
        yield
    counts[name] += counter.count


def _unusable(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no GPU"
    reason = backends.unavailable_reason("native", device)
    if reason is None:
        reason = backends.low_precision_unavailable_reason("native", device)
        reason = None if reason is None else f"its low-precision kernels: {reason}"
    return reason


def main(argv: list[str]) -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller workload (racecheck)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same workload on the CPU's native kernels (no GPU, no sanitizer)")
    parser.add_argument("--count-ops", action="store_true", help="print the ATen operations of each part")
    args = parser.parse_args(argv)
    quick = args.quick
    DEVICE = torch.device(args.device)
    reason = _unusable(DEVICE)
    if reason is not None:
        print(f"native {DEVICE.type} backend unusable: {reason}", file=sys.stderr)
        return 2
    counts: Counter | None = Counter() if args.count_ops else None
    for cls, grid in ((fastlars.LARS, LARS_OPTIONS), (fastlars.LAMB, LAMB_OPTIONS)):
        with _part("fp32 state", counts):
            for options in grid[:1] if quick else grid:
                for dtype, master in STORAGE[:2] if quick else STORAGE:
                    for misaligned in (False, True):
                        _run(cls, options, dtype, master, SHAPES, misaligned)
        if not quick:
            with _part("1300 tensors", counts):
                many = [(0,) if i % 50 == 0 else (1 + i % 70,) for i in range(1300)] + [(0,)]
                _run(cls, {"weight_decay": 1e-2}, torch.float32, False, many, misaligned=False)
    with _part("low-precision state", counts):
        for cls, options, dtype, master, shapes, misaligned in lowbit_runs(quick):
            _run(cls, options, dtype, master, shapes, misaligned, steps=LOWBIT_QUICK_STEPS if quick else 3)
    # GradScaler path: scaled 16-bit gradients unscaled in the kernels.
    with _part("GradScaler", counts):
        model = torch.nn.Linear(64, 64).to(DEVICE)
        opt = fastlars.LAMB(model.parameters(), lr=1e-3, backend="native")
        scaler = torch.amp.GradScaler(DEVICE.type)
        for _ in range(3):
            with torch.autocast(DEVICE.type, dtype=torch.float16 if DEVICE.type == "cuda" else torch.bfloat16):
                loss = model(torch.randn(8, 64, device=DEVICE)).float().square().mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        _synchronize()
    if counts is not None:
        print("ATen operations: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; total {counts.total()}")
    print("sanitizer workload finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
