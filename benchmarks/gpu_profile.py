"""Where a GPU optimizer step's time goes: host (Python + launches) against device (kernels).

    python benchmarks/gpu_profile.py [--params resnet50,bert_large] [--dtype fp32|bf16+master]
                                     [--state fp32,bf16,int8] [--out DIR]

For each parameter set and each case (fastlars native LARS and LAMB under both CUDA launch plans, fastlars
triton, torch's fused SGD and AdamW; with --state listing bf16 or int8, fastlars native and triton with that
optimizer state too), after warm-up:

* host_ms:    median CPU wall time of ``opt.step()`` returning, with the GPU idle before it (synchronised),
              i.e. what the host needs to enqueue one step;
* step_ms:    median wall time of a step with its completion (synchronise after): the step as a loop sees it;
* kernel_ms:  the summed durations of the step's CUDA kernels (torch.profiler), the device's own work;
* launches:   CUDA kernels per step (torch.profiler);
* kernels:    per kernel name, its ms per step (where kernel_ms goes: a low-precision LAMB step's pass 1,
              ratios and pass 2).

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


def _kernels_per_step(fn: Callable[[], None], steps: int = 5) -> tuple[float, float, dict[str, float]]:
    """(summed kernel ms per step, kernels per step, ms per step of each kernel name) over `steps` profiled
    steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name: dict[str, float] = {}
    for e in kernels:
        per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / steps
    return sum(per_name.values()), len(kernels) / steps, dict(sorted(per_name.items(), key=lambda kv: -kv[1]))


ProfileCase = tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer], str | None]


def cases(algorithm: str, master: bool, states: list[str]) -> list[ProfileCase]:
    """(label, optimizer factory, FASTLARS_CUDA_PLAN) per case: fp32 state under both plans, triton and the
    fused peer when ``states`` holds fp32, then native and triton with each low-precision state."""
    from benchmarks.cases import fastlars_optimizer, state_label

    def ours(backend: str, state: str = "fp32") -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
        return lambda params: fastlars_optimizer(algorithm, backend, params, master=master, state=state)

    low = [(f"fastlars.{backend} {algorithm}{state_label(state)}", ours(backend, state), None)
           for state in states if state != "fp32" for backend in ("native", "triton")]
    if "fp32" not in states:
        return low

    if algorithm == "lamb":
        peer = ("torch.AdamW(fused)", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True), None)
    else:
        peer = ("torch.SGD(fused, momentum)",
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-5, fused=True), None)
    return [(f"fastlars.native {algorithm} (onepass)", ours("native"), "onepass"),
            (f"fastlars.native {algorithm} (wave)", ours("native"), "wave"),
            (f"fastlars.triton {algorithm}", ours("triton"), None), peer, *low]


def profile_set(name: str, repeats: int, dtype: str = "fp32", states: tuple[str, ...] = ("fp32",)) -> list[dict]:
    """Rows of one parameter set, LARS then LAMB cases; ``dtype`` fp32, or bf16+master (bf16 params with fp32
    master weights)."""
    import os

    from benchmarks.params import PARAM_SETS, make_params

    master = dtype == "bf16+master"
    rows = []
    for algorithm in ("lars", "lamb"):
        for label, build, plan in cases(algorithm, master, list(states)):
            params = make_params(PARAM_SETS[name].shapes(), torch.bfloat16 if master else torch.float32, "cuda")
            if plan is not None:
                os.environ["FASTLARS_CUDA_PLAN"] = plan
            try:
                opt = build(params)
                for _ in range(3):
                    opt.step()
                host = _median_ms(opt.step, repeats, sync_after=False)
                step = _median_ms(opt.step, repeats, sync_after=True)
                kernel_ms, launches, kernels = _kernels_per_step(opt.step)
            finally:
                os.environ.pop("FASTLARS_CUDA_PLAN", None)
            rows.append({"param_set": name, "dtype": dtype, "tensors": len(params), "case": label, "host_ms": host,
                         "step_ms": step, "kernel_ms": kernel_ms, "launches": launches, "kernels": kernels})
            print(f"{name:<10} {label:<34} host {host:7.3f} ms  step {step:7.3f} ms  kernels {kernel_ms:7.3f} ms"
                  f"  {launches:6.1f} launches", flush=True)
            del opt, params
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Profile the sets named by --params; exit status 2 without a CUDA GPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="resnet50,bert_large")
    parser.add_argument("--dtype", choices=("fp32", "bf16+master"), default="fp32")
    parser.add_argument("--state", default="fp32", help="comma-separated optimizer states: fp32, bf16, int8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    from benchmarks.suite import STATES

    states = tuple(args.state.split(","))
    unknown = sorted(set(states) - set(STATES))
    if unknown:
        parser.error(f"--state: unknown {', '.join(unknown)} ({', '.join(STATES)})")
    if not torch.cuda.is_available():
        print("gpu_profile: needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for name in args.params.split(","):  # written after every set: a run cut short keeps the sets it finished
        record["rows"] += profile_set(name, args.repeats, args.dtype, states)
        (out / "gpu_profile.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
