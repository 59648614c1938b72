"""Launches per optimizer step of the native CUDA kernels under both launch plans (no GPU needed).

    python benchmarks/cuda_plan.py [--params bert_large,resnet50] [--gpus H100,H200]

Prints, for each model, GPU and algorithm, the waves and kernel launches of the step op under the
"wave" plan (a launch group closes at half the L2) and the "onepass" plan (only a full kernel-argument
table closes it), with the range of chunk-kernel grids. It calls fastlars._C.cuda_plan, the host
function (csrc/cuda/launch_plan.h) the CUDA build plans its launches with, so the counts are the
kernels' own, computed from the parameter shapes and the GPU's SM count and L2 size. LARS also runs
the grad-norm op (2 launches per 1,151 tensors), counted separately. fp32 params (one storage bucket).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

GPUS = {"H100": (132, 50_000_000), "H200": (132, 60_000_000)}
"""(SMs, L2 bytes) of the GPUs planned for: H100 SXM and H200 as the project's issues state them."""


def rows(models: list[str], gpus: list[str]) -> list[dict]:
    """One dict per (model, gpu, algorithm, plan): waves, launches, min/max chunk-kernel grid."""
    from benchmarks.params import PARAM_SETS
    from fastlars import _C

    out = []
    for model in models:
        sizes = [math.prod(s) for s in PARAM_SETS[model].shapes()]
        for gpu in gpus:
            sms, l2 = GPUS[gpu]
            norms = _C.cuda_plan("grad_norms", [sizes], sms, l2)["launches"]
            for algo in ("lamb", "lars"):
                for plan in ("wave", "onepass"):
                    r = _C.cuda_plan(algo, [sizes], sms, l2, plan)
                    grids = [g for g, c in zip(r["grid"], r["chunked"]) if c]
                    out.append({"model": model, "tensors": len(sizes), "gpu": gpu, "algorithm": algo, "plan": plan,
                                "waves": r["waves"], "launches": r["launches"],
                                "grad_norm_launches": norms if algo == "lars" else 0,
                                "grid_min": min(grids), "grid_max": max(grids)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="bert_large,resnet50")
    parser.add_argument("--gpus", default="H100,H200")
    args = parser.parse_args(argv)
    table = rows(args.params.split(","), args.gpus.split(","))
    print("| model | tensors | GPU (SMs, L2) | algorithm | plan | waves | launches (+ grad norms) | grids |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        sms, l2 = GPUS[r["gpu"]]
        extra = f" (+{r['grad_norm_launches']})" if r["grad_norm_launches"] else ""
        print(f"| {r['model']} | {r['tensors']} | {r['gpu']} ({sms}, {l2 // 1_000_000} MB) | {r['algorithm']} | "
              f"{r['plan']} | {r['waves']} | {r['launches']}{extra} | {r['grid_min']}–{r['grid_max']} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
    sys.exit(main())
