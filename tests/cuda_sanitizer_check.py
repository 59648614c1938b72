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
backend is not usable on CUDA, so a sanitizer run can never pass by testing nothing.

`--quick` (racecheck, which ran past 30 s on the full workload on an H200): the first option set per
algorithm and fp32 / bf16 + fp32 master storage only, without the 1300-tensor case (under racecheck its
~4000 small torch launches alone outran 50 s there); every kernel still runs, with aligned and
misaligned views, empty tensors and a skipped step (the block reductions racecheck watches are the same
code for every option, dtype and table count).
"""

from __future__ import annotations

import sys

import torch

import fastlars
from fastlars import backends

SHAPES = [(0,), (5,), (0,), (1031,), (16_384,), (16_389,), (33, 17), (0,)]
LARS_OPTIONS = [{"weight_decay": 1e-2}, {"weight_decay": 1e-2, "momentum_style": "torch", "nesterov": True},
                {"weight_decay": 1e-2, "trust_clip": True, "trust_ratio_bounds": (0.01, 10.0)}, {"weight_decay": 0.0}]
LAMB_OPTIONS = [{}, {"decoupled_decay": True, "max_grad_norm": 1.0}, {"bias_correction": False,
                "grad_averaging": False, "trust_clip": True}, {"weight_decay": 0.0}]
STORAGE = [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)]


def _params(shapes, dtype, misaligned: bool) -> list[torch.Tensor]:
    out = []
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        if misaligned:  # a view one element into its storage: 4-element vectors are not aligned
            base = torch.randn(n + 1, device="cuda").to(dtype)
            t = base[1:].view(shape)
        else:
            t = torch.randn(shape, device="cuda").to(dtype)
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
    torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    reason = backends.unavailable_reason("native", torch.device("cuda")) if torch.cuda.is_available() else "no GPU"
    if reason is not None:
        print(f"native CUDA backend unusable: {reason}", file=sys.stderr)
        return 2
    for cls, grid in ((fastlars.LARS, LARS_OPTIONS), (fastlars.LAMB, LAMB_OPTIONS)):
        for options in grid[:1] if quick else grid:
            for dtype, master in STORAGE[:2] if quick else STORAGE:
                for misaligned in (False, True):
                    _run(cls, options, dtype, master, SHAPES, misaligned)
        if not quick:
            many = [(0,) if i % 50 == 0 else (1 + i % 70,) for i in range(1300)] + [(0,)]
            _run(cls, {"weight_decay": 1e-2}, torch.float32, False, many, misaligned=False)
    # GradScaler path: scaled fp16 gradients unscaled in the kernels.
    model = torch.nn.Linear(64, 64).cuda()
    opt = fastlars.LAMB(model.parameters(), lr=1e-3, backend="native")
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(torch.randn(8, 64, device="cuda")).float().square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    print("sanitizer workload finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
