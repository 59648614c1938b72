"""GPU benchmark of one optimizer step: fastlars native CUDA LAMB/LARS against the usual yardsticks.

    python benchmarks/gpu_step.py [--out benchmarks/results] [--repeats 50] [--sets bert_large,resnet50]

Parameter sets (shapes only, built here so no model library is needed): BERT-Large (24 layers,
hidden 1024, vocab 30522, ≈335M parameters, 398 tensors) and ResNet-50 (25.6M parameters, 161
tensors). Storage: fp32, and bf16 params with fp32 master weights (yardsticks without a master
option run on bf16 params directly; their compulsory bytes are counted for what they touch).

Cases: fastlars LAMB (BERT-Large, ResNet-50) and LARS (ResNet-50) on every fastlars backend usable
on the GPU (native, triton, foreach); the reference backend under torch.compile;
torch.optim.AdamW(fused=True) and SGD(fused=True, momentum=0.9); timm Lamb/Lars; apex FusedLAMB
and DeepSpeed FusedLamb when importable (a row with "skipped" and the reason when not).

Per case: median / p10 / p90 step time over ``--repeats`` CUDA-event-timed steps after warm-up,
and the achieved bandwidth in compulsory-traffic terms (bytes each step must read and write
once: LAMB/AdamW w, g, m, v read and w, m, v written = 28 B per fp32 element; LARS/SGD 20 B),
next to the device's measured copy bandwidth (a 2 GiB device-to-device copy, read + write).
The JSON written under ``--out`` records the device name, driver, torch, CUDA, triton and
fastlars versions, and the git commit. Needs a CUDA GPU; exits with status 2 without one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import fastlars
from fastlars import functional

# ----------------------------------------------------------------------------- parameter sets


def bert_large_shapes(layers: int = 24, hidden: int = 1024, ffn: int = 4096, vocab: int = 30522,
                      positions: int = 512) -> list[tuple[int, ...]]:
    """Shapes of BERT-Large pre-training parameters (HF BertForPreTraining, tied decoder weight)."""
    h = hidden
    shapes: list[tuple[int, ...]] = [(vocab, h), (positions, h), (2, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4  # query, key, value, attention output
        shapes += [(h,), (h,)]  # attention LayerNorm
        shapes += [(ffn, h), (ffn,), (h, ffn), (h,)]  # intermediate, output
        shapes += [(h,), (h,)]  # output LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    shapes += [(h, h), (h,), (h,), (h,), (vocab,)]  # MLM transform, its LayerNorm, decoder bias
    shapes += [(2, h), (2,)]  # next-sentence head
    return shapes


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Shapes of torchvision's ResNet-50 parameters (conv weights, BN gains/biases, fc)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = 4 * width
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "bert_large": bert_large_shapes,
    "resnet50": resnet50_shapes,
}

# ------------------------------------------------------------------------------- measurement


@dataclass
class Row:
    """One benchmark result."""

    param_set: str
    storage: str
    algorithm: str
    implementation: str
    ms_median: float | None = None
    ms_p10: float | None = None
    ms_p90: float | None = None
    compulsory_bytes: int | None = None
    gb_per_s: float | None = None
    fraction_of_copy: float | None = None
    skipped: str | None = None


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int = 5) -> list[float]:
    """Per-call times in ms from CUDA events around each call, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbs(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write (2·nbytes per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / (times[len(times) // 2] * 1e-3) / 1e9


def _bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def compulsory_bytes(params: list[Tensor], state: dict[str, list[Tensor]], master: list[Tensor] | None) -> int:
    """Bytes one step must move at least: read w (master when kept), g and every state buffer;
    write w (master and param when kept) and every state buffer."""
    grads = [p.grad for p in params]
    weights = master if master is not None else params
    buffers = [t for ts in state.values() for t in ts]
    read = _bytes(weights) + _bytes(grads) + _bytes(buffers)
    write = _bytes(weights) + _bytes(buffers) + (_bytes(params) if master is not None else 0)
    return read + write


# ------------------------------------------------------------------------------------ cases


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[Tensor]:
    """Parameters with fixed random values and gradients, on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, device="cuda", generator=gen) * 0.02).to(dtype).requires_grad_(True)
        p.grad = (torch.randn(shape, device="cuda", generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


def _state_lists(opt: torch.optim.Optimizer, params: list[Tensor], names: tuple[str, ...]) -> dict[str, list[Tensor]]:
    return {n: [opt.state[p][n] for p in params] for n in names}


def _masters(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor] | None:
    masters = [opt.state[p].get("master_param") for p in params]
    return None if all(m is None for m in masters) else [m if m is not None else p for m, p in zip(masters, params)]


def _fastlars_opt(algorithm: str, backend: str, params: list[Tensor], master: bool):
    """A fastlars LAMB/LARS over one group with weight decay on (trust ratio applied), its state created."""
    if algorithm == "lamb":
        opt = fastlars.LAMB(params, lr=1e-3, weight_decay=0.01, master_weights=master, backend=backend)
        names = ("exp_avg", "exp_avg_sq")
    else:
        opt = fastlars.LARS(params, lr=1.0, momentum=0.9, weight_decay=5e-5, master_weights=master, backend=backend)
        names = ("momentum_buffer",)
    opt.step()
    return opt, names


def fastlars_case(algorithm: str, backend: str, params: list[Tensor], master: bool):
    """fastlars LAMB/LARS step() on one backend."""
    opt, names = _fastlars_opt(algorithm, backend, params, master)
    return opt.step, lambda: compulsory_bytes(params, _state_lists(opt, params, names), _masters(opt, params))


def one_wave_case(algorithm: str, params: list[Tensor], master: bool):
    """fastlars native with FASTLARS_CUDA_WAVE_BYTES=0: one wave per kernel-argument table (fewest
    launches, no L2 reuse between the passes), to measure what the L2-sized waves buy."""
    step, bytes_of = fastlars_case(algorithm, "native", params, master)

    def run() -> None:
        before = os.environ.get("FASTLARS_CUDA_WAVE_BYTES")
        os.environ["FASTLARS_CUDA_WAVE_BYTES"] = "0"
        try:
            step()
        finally:
            if before is None:
                del os.environ["FASTLARS_CUDA_WAVE_BYTES"]
            else:
                os.environ["FASTLARS_CUDA_WAVE_BYTES"] = before

    return run, bytes_of


def compiled_reference_case(algorithm: str, params: list[Tensor], master: bool):
    """The reference backend's functional step under torch.compile (one graph for the whole list)."""
    opt, names = _fastlars_opt(algorithm, "reference", params, master)
    group = opt.param_groups[0]
    state = _state_lists(opt, params, names)
    grads = [p.grad for p in params]
    masters = _masters(opt, params)
    steps = [opt.state[p]["step"] for p in params]

    if algorithm == "lamb":

        @torch.no_grad()
        def step() -> None:
            torch._foreach_add_(steps, 1.0)
            functional.lamb_step(params, grads, state["exp_avg"], state["exp_avg_sq"], steps, lr=group["lr"],
                                 weight_decay=group["weight_decay"], master_params=masters, backend="reference")
    else:

        @torch.no_grad()
        def step() -> None:
            functional.lars_step(params, grads, state["momentum_buffer"], lr=group["lr"], momentum=0.9,
                                 weight_decay=group["weight_decay"], master_params=masters, backend="reference")

    return torch.compile(step), lambda: compulsory_bytes(params, state, masters)


def torch_case(name: str, params: list[Tensor]):
    """torch.optim.AdamW(fused=True) or SGD(fused=True, momentum=0.9) on the params as they are."""
    if name == "adamw_fused":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
        names = ("exp_avg", "exp_avg_sq")
    else:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-5, fused=True)
        names = ("momentum_buffer",)
    opt.step()
    return opt.step, lambda: compulsory_bytes(params, _state_lists(opt, params, names), None)


def timm_case(algorithm: str, params: list[Tensor]):
    """timm's Lamb / Lars (per-tensor PyTorch), when timm is importable."""
    from timm.optim import Lamb, Lars

    if algorithm == "lamb":
        opt = Lamb(params, lr=1e-3, weight_decay=0.01)
        names = ("exp_avg", "exp_avg_sq")
    else:
        opt = Lars(params, lr=1.0, momentum=0.9, weight_decay=5e-5)
        names = ("momentum_buffer",)
    opt.step()
    return opt.step, lambda: compulsory_bytes(params, _state_lists(opt, params, names), None)


def apex_case(params: list[Tensor]):
    """apex.optimizers.FusedLAMB (NVLAMB form with adam_w_mode=True), when apex is importable."""
    from apex.optimizers import FusedLAMB

    opt = FusedLAMB(params, lr=1e-3, weight_decay=0.01)
    opt.step()
    return opt.step, lambda: compulsory_bytes(params, _state_lists(opt, params, ("exp_avg", "exp_avg_sq")), None)


def deepspeed_case(params: list[Tensor]):
    """deepspeed.ops.lamb.FusedLamb, when DeepSpeed and its compiled op are importable."""
    from deepspeed.ops.lamb import FusedLamb

    opt = FusedLamb(params, lr=1e-3, weight_decay=0.01)
    opt.step()
    return opt.step, lambda: compulsory_bytes(params, _state_lists(opt, params, ("exp_avg", "exp_avg_sq")), None)


# -------------------------------------------------------------------------------------- run


def plan(sets: list[str]) -> list[tuple[str, str, str, str, Callable]]:
    """(set, storage, algorithm, implementation, factory(params, master)) for every case."""
    fl_backends = [b for b in ("native", "triton", "foreach") if b in fastlars.available_backends("cuda")]
    cases = []
    for set_name in sets:
        algorithms = ["lamb"] if set_name == "bert_large" else ["lamb", "lars"]
        for storage in ("fp32", "bf16+master"):
            for alg in algorithms:
                for b in fl_backends:
                    cases.append((set_name, storage, alg, f"fastlars.{b}",
                                  lambda p, m, a=alg, b=b: fastlars_case(a, b, p, m)))
                if "native" in fl_backends:
                    cases.append((set_name, storage, alg, "fastlars.native(one wave per table)",
                                  lambda p, m, a=alg: one_wave_case(a, p, m)))
                cases.append((set_name, storage, alg, "fastlars.reference+torch.compile",
                              lambda p, m, a=alg: compiled_reference_case(a, p, m)))
                cases.append((set_name, storage, alg, f"timm.{alg.capitalize()}", lambda p, m, a=alg: timm_case(a, p)))
                if alg == "lamb":
                    cases.append((set_name, storage, alg, "torch.AdamW(fused)",
                                  lambda p, m: torch_case("adamw_fused", p)))
                    cases.append((set_name, storage, alg, "apex.FusedLAMB", lambda p, m: apex_case(p)))
                    cases.append((set_name, storage, alg, "deepspeed.FusedLamb", lambda p, m: deepspeed_case(p)))
                else:
                    cases.append((set_name, storage, alg, "torch.SGD(fused,momentum)",
                                  lambda p, m: torch_case("sgd_fused", p)))
    return cases


def versions() -> dict[str, Any]:
    """Device and software versions for the JSON header."""
    props = torch.cuda.get_device_properties(0)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "device_memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastlars": fastlars.__version__,
        "python": platform.python_version(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for mod in ("triton", "timm", "apex", "deepspeed"):
        try:
            out[mod] = getattr(importlib.import_module(mod), "__version__", "installed")
        except Exception as exc:  # any import failure only means the yardstick is absent
            out[mod] = f"not importable ({type(exc).__name__})"
    try:
        smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        out["driver"] = subprocess.run(smi, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["driver"] = "unknown"
    try:
        git = ["git", "rev-parse", "HEAD"]
        out["commit"] = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = "unknown"
    return out


def run(sets: list[str], repeats: int) -> dict[str, Any]:
    """Measure every case; returns the JSON-ready result."""
    copy_bw = copy_bandwidth_gbs()
    rows: list[Row] = []
    for set_name, storage, alg, impl, factory in plan(sets):
        row = Row(set_name, storage, alg, impl)
        dtype = torch.float32 if storage == "fp32" else torch.bfloat16
        params = make_params(PARAM_SETS[set_name](), dtype)
        try:
            step, bytes_of = factory(params, storage != "fp32")
            times = time_ms(step, repeats)
        except Exception as exc:  # a missing or failing yardstick is recorded, not fatal
            row.skipped = f"{type(exc).__name__}: {exc}"[:300]
        else:
            row.ms_median, row.ms_p10, row.ms_p90 = times[len(times) // 2], times[len(times) // 10], \
                times[(9 * len(times)) // 10]
            row.compulsory_bytes = bytes_of()
            row.gb_per_s = row.compulsory_bytes / (row.ms_median * 1e-3) / 1e9
            row.fraction_of_copy = row.gb_per_s / copy_bw
        rows.append(row)
        print(_line(row), flush=True)
        step = bytes_of = params = None  # free this case's tensors before the next
        torch.cuda.empty_cache()
    return {"machine": versions(), "copy_bandwidth_gbs": copy_bw, "repeats": repeats,
            "rows": [asdict(r) for r in rows], "targets": targets(rows, copy_bw)}


def _find(rows: list[Row], set_name: str, storage: str, alg: str, impl: str) -> Row | None:
    for r in rows:
        if (r.param_set, r.storage, r.algorithm, r.implementation) == (set_name, storage, alg, impl) and r.ms_median:
            return r
    return None


def targets(rows: list[Row], copy_bw: float) -> dict[str, Any]:
    """Issue 4's targets, evaluated on this run (None where a needed row is missing)."""
    lamb = _find(rows, "bert_large", "fp32", "lamb", "fastlars.native")
    apex = _find(rows, "bert_large", "fp32", "lamb", "apex.FusedLAMB")
    lars = _find(rows, "resnet50", "fp32", "lars", "fastlars.native")
    sgd = _find(rows, "resnet50", "fp32", "lars", "torch.SGD(fused,momentum)")
    return {
        "lamb_bert_fp32_fraction_of_copy (target >= 0.8)": lamb and lamb.gb_per_s / copy_bw,
        "apex_over_native_lamb_bert_fp32 (target >= 1.5)": (lamb and apex) and apex.ms_median / lamb.ms_median,
        "native_lars_over_sgd_fused_resnet50_fp32 (target <= 1.2)": (lars and sgd) and lars.ms_median / sgd.ms_median,
    }


def _line(r: Row) -> str:
    head = f"{r.param_set:<10} {r.storage:<11} {r.algorithm:<4} {r.implementation:<34}"
    if r.skipped:
        return f"{head} skipped: {r.skipped}"
    return f"{head} {r.ms_median:8.3f} ms  {r.gb_per_s:7.1f} GB/s  {100 * r.fraction_of_copy:5.1f}% of copy"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the JSON")
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per case")
    parser.add_argument("--sets", default="bert_large,resnet50", help="comma-separated: " + ", ".join(PARAM_SETS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step: needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in PARAM_SETS]
    if unknown:
        parser.error(f"--sets: unknown {unknown}; choose from {list(PARAM_SETS)}")
    if args.repeats < 5:
        parser.error("--repeats: at least 5")
    result = run(sets, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    name = result["machine"]["device"].replace(" ", "_").replace("/", "_")
    path = args.out / f"gpu_step_{name}_{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"copy bandwidth {result['copy_bandwidth_gbs']:.0f} GB/s; targets {result['targets']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
