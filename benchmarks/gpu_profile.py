"""Where a GPU optimizer step's time goes: host (Python + launches) against device (kernels).

    python benchmarks/gpu_profile.py [--params resnet50,bert_large] [--out DIR]

For each parameter set (fp32) and each case (fastlars native LARS and LAMB under both CUDA launch plans,
fastlars triton, torch's fused SGD and AdamW), after warm-up:

* host_ms:    median CPU wall time of ``opt.step()`` returning, with the GPU idle before it (synchronised),
              i.e. what the host needs to enqueue one step;
* step_ms:    median wall time of a step with its completion (synchronise after): the step as a loop sees it;
* kernel_ms:  the summed durations of the step's CUDA kernels (torch.profiler), the device's own work;
* launches:   CUDA kernels per step (torch.profiler).

step_ms ≈ max(host_ms, kernel_ms) + latency: when host_ms is the larger, the step is bound by the host,
and a faster kernel changes nothing. Prints a table; writes gpu_profile.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _median_ms(fn: Callable[[], None], repeats: int, sync_after: bool) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync_after:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _kernels_per_step(fn: Callable[[], None], steps: int = 5) -> tuple[float, float]:
    """(summed kernel ms per step, kernels per step) over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    return total_us / 1e3 / steps, len(kernels) / steps


def _cases(algorithm: str) -> list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer], str | None]]:
    """(label, optimizer factory, FASTLARS_CUDA_PLAN) per case."""
    from benchmarks.cases import fastlars_optimizer

    def ours(backend: str) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        return lambda params: fastlars_optimizer(algorithm, backend, params, master=False)

    if algorithm == "lamb":
        peer = ("torch.AdamW(fused)", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True), None)
    else:
        peer = ("torch.SGD(fused, momentum)",
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-5, fused=True), None)
    return [(f"fastlars.native {algorithm} (onepass)", ours("native"), "onepass"),
            (f"fastlars.native {algorithm} (wave)", ours("native"), "wave"),
            (f"fastlars.triton {algorithm}", ours("triton"), None), peer]


def profile_set(name: str, repeats: int) -> list[dict]:
    """Rows of one parameter set (fp32), LARS then LAMB cases."""
    import os

    from benchmarks.params import PARAM_SETS, make_params

    rows = []
    for algorithm in ("lars", "lamb"):
        for label, build, plan in _cases(algorithm):
            params = make_params(PARAM_SETS[name].shapes(), torch.float32, "cuda")
            if plan is not None:
                os.environ["FASTLARS_CUDA_PLAN"] = plan
            try:
                opt = build(params)
                for _ in range(3):
                    opt.step()
                host = _median_ms(opt.step, repeats, sync_after=False)
                step = _median_ms(opt.step, repeats, sync_after=True)
                kernel_ms, launches = _kernels_per_step(opt.step)
            finally:
                os.environ.pop("FASTLARS_CUDA_PLAN", None)
            rows.append({"param_set": name, "tensors": len(params), "case": label, "host_ms": host,
                         "step_ms": step, "kernel_ms": kernel_ms, "launches": launches})
            print(f"{name:<10} {label:<34} host {host:7.3f} ms  step {step:7.3f} ms  kernels {kernel_ms:7.3f} ms"
                  f"  {launches:6.1f} launches", flush=True)
            del opt, params
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Profile the sets named by --params; exit status 2 without a CUDA GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="resnet50,bert_large")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    rows = [row for name in args.params.split(",") for row in profile_set(name, args.repeats)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (out / "gpu_profile.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
