"""Runs the cases side by side in one process and renders the results (Markdown, JSON, PNG)."""

from __future__ import annotations

import datetime as dt
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import fastlars
from benchmarks.cases import (
    GRAD_SCALER_SUFFIX,
    UNCHECKED_SUFFIX,
    Case,
    fastlars_case,
    native_plan_case,
    peer_cases,
    unchecked,
    with_grad_scaler,
)
from benchmarks.measure import (
    Probe,
    bandwidth_probes,
    best_roofline,
    copy_bandwidth_gbs,
    inplace_bandwidth_gbs,
    last_level_cache_bytes,
    repeats_within,
    roofline_fraction,
    stream_bandwidths_gbs,
    time_rounds,
    warm_up,
)
from benchmarks.params import PARAM_SETS, make_params
from benchmarks.targets import evaluate, targets_markdown
from fastlars._extension import extension
from fastlars.env import cpu_name

DTYPES = {"fp32": (torch.float32, False), "bf16+master": (torch.bfloat16, True), "bf16": (torch.bfloat16, False)}


@dataclass
class Row:
    """One case's result; `skipped` holds the reason when it could not run."""

    param_set: str
    dtype: str
    optim: str
    implementation: str
    peer: bool
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    compulsory_bytes: int | None = None
    gb_per_s: float | None = None
    fraction_of_copy: float | None = None
    fraction_of_inplace: float | None = None
    repeats: int | None = None
    skipped: str | None = None
    threads: int | None = None  # torch.get_num_threads() while timed (None in results before issue 21)
    cpu_over_wall: float | None = None  # process CPU time / wall time while timed (CPU only)
    fraction_of_roofline: float | None = None  # of the best streaming bandwidth on `threads` threads
    table_roofline_gbs: float | None = None  # the best probe timed in this row's own rounds (CPU, big sets)


def cpu_vector_isa() -> str:
    """The widest x86 vector extension the CPU reports (/proc/cpuinfo): "avx512", "avx2" or "none"."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "none"


def machine(device: torch.device) -> dict[str, Any]:
    """Device, software versions and git commit, recorded with every result."""
    info: dict[str, Any] = {"device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                            "fastlars": fastlars.__version__, "python": platform.python_version(),
                            "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(smi, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = "unknown"
    else:
        info["device"] = cpu_name()
        info["cpus"] = os.cpu_count()
        info["loadavg_1_5_15min_at_start"] = os.getloadavg()  # other processes competing for the cores
        info["cpu_vector_isa"] = cpu_vector_isa()
        ext = extension()
        info["kernel_isa"] = ext.cpu_isa() if ext is not None and hasattr(ext, "cpu_isa") else "not built"
        if ext is not None and hasattr(ext, "cpu_cache_plan"):
            info["kernel_cache_plan"] = ext.cpu_cache_plan()
    for module in ("triton", "timm", "torch_optimizer", "apex", "deepspeed"):
        try:
            info[module] = getattr(importlib.import_module(module), "__version__", "installed")
        except Exception as exc:
            info[module] = f"not importable ({type(exc).__name__})"
    for dist in ("bitsandbytes", "torchao", "torch-optimi"):  # low-precision peers: versions without importing
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


STATES = ("fp32", "bf16", "int8")
"""--state choices: the state_dtype of the fastlars rows (bf16/int8 rows beside the fp32 ones)."""


def plan(optim: str, backends: list[str], peers: tuple[str, ...], device: torch.device,
         states: tuple[str, ...] = ("fp32",), skip_nonfinite: tuple[bool, ...] = (True,)) -> list[Case]:
    """fastlars on each backend, then the peers. On CUDA the native backend is timed under both launch plans:
    "fastlars.native" runs the default (onepass), "fastlars.native(wave plan)" the other. Each low-precision
    state of ``states`` adds the backends that step it on ``device`` (e.g. "fastlars.native [int8 state]").
    False in ``skip_nonfinite`` adds each fp32 backend stepped without the non-finite check (cases.unchecked;
    True: the default rows)."""
    fp32 = "fp32" in states
    ours = [fastlars_case(optim, b) for b in backends] if fp32 and True in skip_nonfinite else []
    if fp32 and False in skip_nonfinite:
        ours += [unchecked(fastlars_case(optim, b)) for b in backends]
    if device.type == "cuda" and "native" in backends and "fp32" in states:
        ours.append(native_plan_case(optim, "wave"))
    for state in (s for s in states if s != "fp32"):
        ours += [fastlars_case(optim, b, state) for b in backends if fastlars.backends.supports_low_precision_state(b)
                 and fastlars.backends.low_precision_unavailable_reason(b, device) is None]
    return ours + peer_cases(optim, peers)


def thread_counts(spec: str | None, device: torch.device) -> list[int]:
    """--threads: comma-separated counts or 'all' (torch.get_num_threads() at start); default 'all,1' on
    the CPU (the thread-scaling table), the current count on a GPU. Largest first, no repeats."""
    full = torch.get_num_threads()
    if spec is None:
        spec = "all,1" if device.type == "cpu" else "all"
    counts = []
    for item in spec.split(","):
        n = full if item.strip() == "all" else int(item)
        if n < 1:
            raise ValueError(f"thread count {n} < 1")
        counts.append(n)
    return sorted(set(counts), reverse=True)


def rooflines(device: torch.device, counts: list[int], log: Any = print) -> dict[str, dict[str, float]]:
    """Per thread count (as a string key, for JSON): each streaming mix's GB/s and "best", their maximum
    (the CPU roofline, benchmarks.measure). Empty on a GPU."""
    if device.type != "cpu":
        return {}
    before = torch.get_num_threads()
    out = {}
    try:
        for n in counts:
            torch.set_num_threads(n)
            mixes = stream_bandwidths_gbs()
            out[str(n)] = {**mixes, "best": max(mixes.values())}
            log(f"cpu, {n} thread(s): streaming " + ", ".join(f"{k} {v:.1f}" for k, v in mixes.items())
                + f" GB/s; roofline {out[str(n)]['best']:.1f} GB/s")
    finally:
        torch.set_num_threads(before)
    return out


def run(device: torch.device, sets: list[str], optims: list[str], dtypes: list[str], backends: list[str],
        peers: tuple[str, ...], repeats: int, budget_s: float | None = None, log: Any = print,
        on_row: Callable[[dict[str, Any]], None] | None = None, threads: list[int] | None = None,
        states: tuple[str, ...] = ("fp32",), rounds: int = 5,
        grad_scalers: tuple[bool, ...] = (False,), skip_nonfinite: tuple[bool, ...] = (True,)) -> dict[str, Any]:
    """Every (threads, set, dtype, optim, case) in this process; JSON-ready result. The cases of one
    (threads, set, dtype, optim) are built together and timed side by side in `rounds` interleaved rounds
    (measure.time_rounds), so their ratios do not carry the machine's drift between cases.
    `threads`: torch.set_num_threads for each pass over the cases, largest first (default: the current
    count). `budget_s` caps the timed seconds of a slow case (see measure.repeats_within); `on_row` gets the
    result so far (with "partial": True) after every group of rows, so an interrupted run keeps what it
    measured. `states`: the state dtypes of the fastlars rows (see plan). `grad_scalers`: for True, each
    table is also timed with every case stepped through a GradScaler (cases.with_grad_scaler), its dtype
    labelled e.g. "fp32+GradScaler". `skip_nonfinite`: see plan; the GradScaler tables take the default rows
    only (there the scaler's flag replaces the check either way)."""
    counts = threads or [torch.get_num_threads()]
    copy_bw = copy_bandwidth_gbs(device)
    inplace_bw = inplace_bandwidth_gbs(device)
    log(f"{device}: copy bandwidth {copy_bw:.1f} GB/s, in-place x += y bandwidth {inplace_bw:.1f} GB/s")
    roofs = rooflines(device, counts, log)
    cache = last_level_cache_bytes() if device.type == "cpu" else 0
    result: dict[str, Any] = {"machine": machine(device), "copy_bandwidth_gbs": copy_bw,
                              "inplace_bandwidth_gbs": inplace_bw, "rooflines_gbs": roofs,
                              "last_level_cache_bytes": cache, "thread_counts": counts, "repeats": repeats,
                              "budget_s": budget_s, "rounds": rounds, "states": list(states),
                              "grad_scalers": list(grad_scalers), "skip_nonfinite": list(skip_nonfinite),
                              "partial": True,
                              "rows": []}
    before = torch.get_num_threads()
    try:
        for n in counts:
            torch.set_num_threads(n)
            roof = roofs.get(str(n), {}).get("best")
            for set_name in sets:
                shapes = PARAM_SETS[set_name].shapes()
                bounded = device.type == "cpu" and not host_overhead_set(set_name)
                for dtype_name, scaled in ((d, g) for d in dtypes for g in grad_scalers):
                    dtype, master = DTYPES[dtype_name]
                    label = dtype_name + (GRAD_SCALER_SUFFIX if scaled else "")
                    for optim in optims:
                        cases = plan(optim, backends, peers, device, states, (True,) if scaled else skip_nonfinite)
                        if scaled:
                            cases = [with_grad_scaler(case) for case in cases]
                        rows = [Row(set_name, label, optim, case.implementation, case.peer, threads=n)
                                for case in cases]
                        probed = _measure_side_by_side(rows, cases, shapes, dtype, master, device, repeats,
                                                       budget_s, rounds, Bandwidths(copy_bw, inplace_bw, roof),
                                                       bandwidth_probes() if bounded else [])
                        if probed:
                            result.setdefault("table_rooflines_gbs", []).append(
                                {"threads": n, "param_set": set_name, "dtype": label, "optim": optim, **probed})
                        for row in rows:
                            result["rows"].append(asdict(row))
                            log(line(row))
                        if on_row is not None:
                            on_row(result)
    finally:
        torch.set_num_threads(before)
    if roofs:  # probed again after the rows: the roofline is the best of both probes
        result["rooflines_gbs"] = merge_rooflines(roofs, rooflines(device, counts, log))
        apply_rooflines(result)
    result["partial"] = False
    return result


def merge_rooflines(*probes: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per thread count and mix, the highest GB/s of several probes; "best" = the highest mix."""
    merged: dict[str, dict[str, float]] = {}
    for probe in probes:
        for n, mixes in probe.items():
            into = merged.setdefault(n, {})
            for mix, gbs in mixes.items():
                into[mix] = max(into.get(mix, 0.0), gbs)
    for mixes in merged.values():
        mixes["best"] = max(v for k, v in mixes.items() if k != "best")
    return merged


def apply_rooflines(result: dict[str, Any]) -> None:
    """Sets every row's fraction_of_roofline from the best of result["rooflines_gbs"] of its thread count
    (probed before and after the rows) and the row's table_roofline_gbs (probed in its own rounds), and lists
    the rows above 100% in result["over_roofline"] (the probe then under-measured the machine, e.g.
    under load: such a row is reported, never capped)."""
    roofs = result.get("rooflines_gbs") or {}
    over = []
    for r in result["rows"]:
        if r["skipped"] or r.get("threads") is None:
            continue
        best = best_roofline(roofs.get(str(r["threads"]), {}).get("best"), r.get("table_roofline_gbs"))
        r["fraction_of_roofline"] = roofline_fraction(r["gb_per_s"], best, host_overhead_set(r["param_set"]))
        if r["fraction_of_roofline"] is not None and r["fraction_of_roofline"] > 1.0:
            over.append(f"{r['param_set']} {r['dtype']} {r['optim']} {r['implementation']} on {r['threads']} "
                        f"thread(s): {100 * r['fraction_of_roofline']:.0f}%")
    result["over_roofline"] = over


def host_overhead_set(name: str) -> bool:
    """Whether `name` is a host-overhead set (benchmarks.params.ParamSet.host_overhead); unknown names are not."""
    param_set = PARAM_SETS.get(name)
    return param_set is not None and param_set.host_overhead


@dataclass(frozen=True)
class Bandwidths:
    """What a row's GB/s is compared with: copy and in-place bandwidth and the roofline on its threads (None
    on a GPU)."""

    copy_gbs: float
    inplace_gbs: float
    roofline_gbs: float | None


def _measure_side_by_side(rows: list[Row], cases: list[Case], shapes: list, dtype: torch.dtype, master: bool,
                          device: torch.device, repeats: int, budget_s: float | None, rounds: int,
                          bandwidths: Bandwidths, probes: list[Probe] | None = None) -> dict[str, float]:
    """Builds every case on its own parameters and warms it up (a case that fails records why in its row's
    `skipped`), times the rest side by side in `rounds` rounds, fills the rows, then frees the tensors.
    `probes` (the CPU roofline's bandwidth probes) are timed in the same rounds as further cases, so the
    roofline sees the same minutes of this machine as the rows (its memory bandwidth drifts by up to 2×
    within minutes); returns each probe's GB/s (fastest call) and "best", or {} without probes."""
    steps: list[tuple[Row, Callable[[], Any], Callable[[], int], int]] = []
    for row, case in zip(rows, cases):
        try:
            params = make_params(shapes, dtype, device)
            step, bytes_of = case.factory(params, master)
            last_s = warm_up(step, device, budget_s=budget_s)
        except Exception as exc:
            row.skipped = f"{type(exc).__name__}: {exc}"[:200]
            continue
        steps.append((row, step, bytes_of, repeats_within(repeats, budget_s, last_s)))
        params = step = bytes_of = None
    probes = probes or []
    probe_repeats = [repeats_within(repeats, budget_s, warm_up(p.step, device, warmup=2)) for p in probes]
    timings = time_rounds([s[1] for s in steps] + [p.step for p in probes], [s[3] for s in steps] + probe_repeats,
                          device, rounds)
    probed = {p.name: p.gbs(t) for p, t in zip(probes, timings[len(steps):])}
    if probed:
        probed["best"] = max(probed.values())
    roofline = best_roofline(bandwidths.roofline_gbs, probed.get("best"))
    for (row, _, bytes_of, _), timing in zip(steps, timings):
        row.ms_median, row.ms_min, row.ms_max = timing.median, timing.low, timing.high
        row.compulsory_bytes = bytes_of()
        row.gb_per_s = row.compulsory_bytes / (timing.median * 1e-3) / 1e9
        row.fraction_of_copy = row.gb_per_s / bandwidths.copy_gbs
        row.fraction_of_inplace = row.gb_per_s / bandwidths.inplace_gbs
        row.table_roofline_gbs = probed.get("best")
        row.fraction_of_roofline = roofline_fraction(row.gb_per_s, roofline, host_overhead_set(row.param_set))
        row.cpu_over_wall = timing.cpu_over_wall
        row.repeats = timing.repeats
    steps = timings = []
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return probed


def line(r: Row) -> str:
    head = f"{r.param_set:<10} {r.dtype:<11} {r.optim:<4} {r.implementation:<40} {r.threads or '':>2}t"
    if r.skipped:
        return f"{head} skipped: {r.skipped}"
    return (f"{head} {_ms(r.ms_median):>9} ms ({_ms(r.ms_min)}–{_ms(r.ms_max)}, n={r.repeats})  {r.gb_per_s:6.1f} GB/s"
            f"  {_pct(r.fraction_of_roofline):>5} of roofline  CPU/wall {_ratio(r.cpu_over_wall)}")


def _ms(ms: float) -> str:
    return f"{ms:.2f}" if ms >= 10 else f"{ms:.3g}"


def _pct(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.0f}%"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def main_threads(result: dict[str, Any]) -> int | None:
    """The thread count of the main tables: the run's largest (None for results without thread counts)."""
    counts = result.get("thread_counts")
    return max(counts) if counts else None


def main_rows(result: dict[str, Any]) -> list[Row]:
    """Rows timed on the main thread count (every row of a result from before thread counts)."""
    full = main_threads(result)
    return [Row(**r) for r in result["rows"] if full is None or r.get("threads") in (None, full)]


def _header(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    isa = (f", {m['cpu_vector_isa'].upper().replace('AVX512', 'AVX-512')} CPU, {m['kernel_isa']} kernels"
           if "cpu_vector_isa" in m else "")
    plan = m.get("kernel_cache_plan")
    if plan:
        isa += (f"; last-level cache {plan['last_level_cache_bytes'] >> 20} MiB, LAMB keeps u for groups of up to "
                f"{plan['lamb_workspace_elements']:,} elements")
    cpu = m["device_type"] == "cpu"
    text = [f"Machine: {m['device']} ({m.get('cpus', '')} CPUs, {m['threads']} threads{isa})" if cpu
            else f"Machine: {m['device']}", f"torch {m['torch']}, fastlars {m['fastlars']}, commit {m['commit'][:10]}, "
            f"{m['date_utc']}; copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s (2 B per copied byte), in-place "
            f"x += y {result.get('inplace_bandwidth_gbs', float('nan')):.1f} GB/s (3 B per element byte); "
            f"{result['repeats']} timed steps per case (n: fewer for slow cases, at least 3), median (min–max)"
            + (f", the cases of a table timed side by side in {result['rounds']} interleaved rounds"
               if result.get("rounds") else ", the cases timed one after the other")
            + (f"; load average at start {', '.join(f'{x:.1f}' for x in m['loadavg_1_5_15min_at_start'])} "
               "(1, 5, 15 min)" if "loadavg_1_5_15min_at_start" in m else "")]
    roofs = result.get("rooflines_gbs") or {}
    if roofs:
        text.append("Roofline = the best streaming bandwidth of fastlars._C.stream_pass on the same threads (fastest "
                    "pass; read-only sum 4 B/element, in-place x = c·x + z 12 B, two in-place arrays and one read "
                    "20 B), torch's x += y and torch's fused SGD(momentum) and AdamW steps over one large tensor "
                    "(20 and 28 B): " + "; ".join(
                        f"{n} thread(s) {v['best']:.1f} GB/s (" + ", ".join(
                            f"{k} {g:.1f}" for k, g in v.items() if k != "best") + ")" for n, v in roofs.items())
                    + ". Each table of a model's set also times these probes as further "
                    "cases of its own interleaved rounds (this VM's bandwidth drifts by up to 2× within minutes), "
                    "and its rows' % is of the best of both"
                    + ". % of roofline is left out (—) for the host-overhead sets (a few thousand parameters: "
                    "those steps measure host work). "
                    "CPU/wall = process CPU time / wall time while timed (all threads busy: = threads).")
    if True in (result.get("grad_scalers") or []):
        text.append(f"Tables labelled {GRAD_SCALER_SUFFIX}: every case stepped as mixed-precision training steps it, "
                    "scaler.step(opt) then scaler.update() with a torch.amp.GradScaler (scale 1.0, no growth): the "
                    "scaler checks every gradient for NaN/inf first; fastlars and torch's fused optimizers take its "
                    "scale and flag inside their step (fastlars then skips its own gradient-norm pass), the others "
                    "are unscaled in place first; the compiled functional reference has no optimizer to hand it "
                    "(skipped). GB/s counts each step's own compulsory bytes, not the scaler's pass.")
    if False in (result.get("skip_nonfinite") or []):
        text.append(f"Rows labelled{UNCHECKED_SUFFIX}: fastlars with opt.skip_nonfinite = False, no pass over the "
                    "gradients for NaN/inf before the update (LARS takes ||g|| in its ||w|| pass), so a non-finite "
                    "gradient reaches the state as it does in torch's fused optimizers; the unlabelled fastlars rows "
                    "read every gradient first and skip the whole step on one.")
    return [*text, ""]


def markdown(result: dict[str, Any]) -> str:
    """Per (set, dtype, optim) on the main thread count: a table of every implementation, then fastlars'
    speed-up over each peer (peer median / fastlars median); then host overhead per step on the
    host-overhead sets, the thread-scaling table and the issues' targets."""
    out = ["**Partial run: interrupted before every case was measured.**", ""] if result.get("partial") else []
    out += _header(result)
    rows = main_rows(result)
    keys = list(dict.fromkeys((r.param_set, r.dtype, r.optim) for r in rows))
    full = main_threads(result)
    for key in keys:
        group = [r for r in rows if (r.param_set, r.dtype, r.optim) == key]
        out += [f"**{key[0]}, {key[1]}, {key[2].upper()}**" + (f" ({full} threads)" if full else ""), "",
                "| implementation | step time ms (n) | GB/s | % of roofline | % of copy | CPU/wall |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in group:
            if r.skipped:
                out.append(f"| {r.implementation} | skipped: {r.skipped} | | | | |")
            else:
                out.append(f"| {r.implementation} | {_ms(r.ms_median)} ({_ms(r.ms_min)}–{_ms(r.ms_max)}, {r.repeats}) "
                           f"| {r.gb_per_s:.1f} | {_pct(r.fraction_of_roofline)} | {100 * r.fraction_of_copy:.0f}% | "
                           f"{_ratio(r.cpu_over_wall)} |")
        ours = [r for r in group if not r.peer and not r.skipped]
        peers = [r for r in group if r.peer and not r.skipped]
        if ours and peers:
            out += ["", "| speed-up over → | " + " | ".join(p.implementation for p in peers) + " |",
                    "|---|" + "---:|" * len(peers)]
            for r in ours:
                out.append(f"| {r.implementation} | " + " | ".join(f"{p.ms_median / r.ms_median:.2f}×" for p in peers)
                           + " |")
        out.append("")
    if result.get("over_roofline"):
        out += ["**Rows above the roofline (the bandwidth probe under-measured; rerun on a quiet machine):** "
                + "; ".join(result["over_roofline"]), ""]
    out += host_overhead_markdown(result)
    out += scaling_markdown(result)
    if result.get("not_measured"):
        out += ["Not measured: " + "; ".join(f"{k} ({v})" for k, v in result["not_measured"].items()), ""]
    targets = targets_markdown(evaluate(result))
    if targets:
        out += ["Targets of the issues (fp32):", "", targets, ""]
    return "\n".join(out)


def host_overhead_markdown(result: dict[str, Any]) -> list[str]:
    """Per step µs of every implementation on the host-overhead sets (`ParamSet.host_overhead`: the per-step
    host cost: Python, validation, launches), one column per set and optim."""
    small = [r for r in main_rows(result) if not r.skipped and r.compulsory_bytes is not None
             and host_overhead_set(r.param_set)]
    if not small:
        return []
    columns = list(dict.fromkeys((r.param_set, r.dtype, r.optim) for r in small))
    names = list(dict.fromkeys(r.implementation for r in small))
    cell = {(r.param_set, r.dtype, r.optim, r.implementation): r for r in small}
    out = ["**Host overhead: µs per step on host-overhead sets (median)**", "",
           "| implementation | " + " | ".join(f"{s} {d} {o.upper()}" for s, d, o in columns) + " |",
           "|---|" + "---:|" * len(columns)]
    for name in names:
        values = [cell.get((*c, name)) for c in columns]
        out.append(f"| {name} | " + " | ".join("" if v is None else f"{1000 * v.ms_median:.0f}" for v in values) + " |")
    return [*out, ""]


def scaling_markdown(result: dict[str, Any]) -> list[str]:
    """Each implementation at the fewest and the most threads of the run: step times, speed-up, CPU/wall
    and % of the roofline on each count (empty for a run on one thread count)."""
    counts = result.get("thread_counts") or []
    if len(counts) < 2:
        return []
    lo, hi = min(counts), max(counts)
    rows = [Row(**r) for r in result["rows"] if not r["skipped"]]
    at = {(r.param_set, r.dtype, r.optim, r.implementation, r.threads): r for r in rows}
    out = [f"**Thread scaling: {lo} vs {hi} threads (torch.set_num_threads)**", "",
           f"| set | optim | implementation | ms, {lo} thr | ms, {hi} thr | speed-up | CPU/wall, {lo} thr | "
           f"CPU/wall, {hi} thr | % roofline, {lo} thr | % roofline, {hi} thr |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in dict.fromkeys((r.param_set, r.dtype, r.optim, r.implementation) for r in rows):
        a, b = at.get((*key, lo)), at.get((*key, hi))
        if a is None or b is None:
            continue
        dtype = "" if key[1] == "fp32" else f" {key[1]}"
        out.append(f"| {key[0]}{dtype} | {key[2].upper()} | {key[3]} | {_ms(a.ms_median)} | {_ms(b.ms_median)} | "
                   f"{a.ms_median / b.ms_median:.2f}× | {_ratio(a.cpu_over_wall)} | {_ratio(b.cpu_over_wall)} | "
                   f"{_pct(a.fraction_of_roofline)} | {_pct(b.fraction_of_roofline)} |")
    return [*out, ""]


def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of median step time per implementation, one panel per (set, dtype, optim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in main_rows(result) if not r.skipped]
    keys = list(dict.fromkeys((r.param_set, r.dtype, r.optim) for r in rows))
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 1.2 + 0.45 * max(len(rows) // max(len(keys), 1), 3) * len(keys)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        group = [r for r in rows if (r.param_set, r.dtype, r.optim) == key]
        names = [r.implementation for r in group]
        ax.barh(names, [r.ms_median for r in group], color=["tab:gray" if r.peer else "tab:blue" for r in group],
                xerr=[[r.ms_median - r.ms_min for r in group], [r.ms_max - r.ms_median for r in group]])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("step time, ms, log scale (median, min–max)")
        ax.set_title(f"{key[0]} {key[1]} {key[2].upper()} — {result['machine']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: Path, stem: str, with_plot: bool = True) -> list[Path]:
    """JSON, Markdown and (with_plot) PNG of a result under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result) + "\n")
    if with_plot:
        plot(result, paths[2])
    return paths if with_plot else paths[:2]
