"""Runs the cases side by side in one process and renders the results (Markdown, JSON, PNG)."""

from __future__ import annotations

import datetime as dt
import gc
import importlib
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
from benchmarks.cases import Case, fastlars_case, one_wave_case, peer_cases
from benchmarks.measure import copy_bandwidth_gbs, inplace_bandwidth_gbs, time_ms
from benchmarks.params import PARAM_SETS, make_params
from benchmarks.targets import evaluate, targets_markdown
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
    for module in ("triton", "timm", "torch_optimizer", "apex", "deepspeed"):
        try:
            info[module] = getattr(importlib.import_module(module), "__version__", "installed")
        except Exception as exc:
            info[module] = f"not importable ({type(exc).__name__})"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def plan(optim: str, backends: list[str], peers: tuple[str, ...], device: torch.device) -> list[Case]:
    """fastlars on each backend (native CUDA also with one wave per table), then the peers."""
    ours = [fastlars_case(optim, b) for b in backends]
    if device.type == "cuda" and "native" in backends:
        ours.append(one_wave_case(optim))
    return ours + peer_cases(optim, peers)


def run(device: torch.device, sets: list[str], optims: list[str], dtypes: list[str], backends: list[str],
        peers: tuple[str, ...], repeats: int, budget_s: float | None = None, log: Any = print,
        on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every (set, dtype, optim, case), one after the other in this process; JSON-ready result.
    `budget_s` caps the timed seconds of a slow case (see time_ms); `on_row` gets the result so far
    (with "partial": True) after every row, so an interrupted run keeps what it measured."""
    copy_bw = copy_bandwidth_gbs(device)
    inplace_bw = inplace_bandwidth_gbs(device)
    log(f"{device}: copy bandwidth {copy_bw:.1f} GB/s, in-place x += y bandwidth {inplace_bw:.1f} GB/s")
    result: dict[str, Any] = {"machine": machine(device), "copy_bandwidth_gbs": copy_bw,
                              "inplace_bandwidth_gbs": inplace_bw, "repeats": repeats, "budget_s": budget_s,
                              "partial": True, "rows": []}
    for set_name in sets:
        shapes = PARAM_SETS[set_name].shapes()
        for dtype_name in dtypes:
            dtype, master = DTYPES[dtype_name]
            for optim in optims:
                for case in plan(optim, backends, peers, device):
                    row = Row(set_name, dtype_name, optim, case.implementation, case.peer)
                    params = make_params(shapes, dtype, device)
                    try:
                        step, bytes_of = case.factory(params, master)
                        timing = time_ms(step, device, repeats, budget_s=budget_s)
                    except Exception as exc:
                        row.skipped = f"{type(exc).__name__}: {exc}"[:200]
                    else:
                        row.ms_median, row.ms_min, row.ms_max = timing.median, timing.low, timing.high
                        row.compulsory_bytes = bytes_of()
                        row.gb_per_s = row.compulsory_bytes / (timing.median * 1e-3) / 1e9
                        row.fraction_of_copy = row.gb_per_s / copy_bw
                        row.fraction_of_inplace = row.gb_per_s / inplace_bw
                        row.repeats = timing.repeats
                    result["rows"].append(asdict(row))
                    log(line(row))
                    if on_row is not None:
                        on_row(result)
                    step = bytes_of = params = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    result["partial"] = False
    return result


def line(r: Row) -> str:
    head = f"{r.param_set:<10} {r.dtype:<11} {r.optim:<4} {r.implementation:<40}"
    if r.skipped:
        return f"{head} skipped: {r.skipped}"
    return (f"{head} {r.ms_median:9.2f} ms ({r.ms_min:.2f}–{r.ms_max:.2f}, n={r.repeats})  {r.gb_per_s:6.1f} GB/s  "
            f"{100 * r.fraction_of_copy:5.1f}% of copy")


def markdown(result: dict[str, Any]) -> str:
    """Per (set, dtype, optim): a table of every implementation, then fastlars' speed-up over each peer
    (peer median / fastlars median)."""
    m = result["machine"]
    out = ["**Partial run: interrupted before every case was measured.**", ""] if result.get("partial") else []
    out += [f"Machine: {m['device']} ({m.get('cpus', '')} CPUs, {m['threads']} threads)" if m["device_type"] == "cpu"
           else f"Machine: {m['device']}", f"torch {m['torch']}, fastlars {m['fastlars']}, commit {m['commit'][:10]}, "
           f"{m['date_utc']}; copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s (2 B per copied byte), in-place "
           f"x += y {result.get('inplace_bandwidth_gbs', float('nan')):.1f} GB/s (3 B per element byte); "
           f"{result['repeats']} timed steps per case (n: fewer for slow cases, at least 3), median (min–max)"
           + (f"; load average at start {', '.join(f'{x:.1f}' for x in m['loadavg_1_5_15min_at_start'])} (1, 5, 15 min)"
              if "loadavg_1_5_15min_at_start" in m else ""), ""]
    rows = [Row(**r) for r in result["rows"]]
    keys = list(dict.fromkeys((r.param_set, r.dtype, r.optim) for r in rows))
    for key in keys:
        group = [r for r in rows if (r.param_set, r.dtype, r.optim) == key]
        out += [f"**{key[0]}, {key[1]}, {key[2].upper()}**", "",
                "| implementation | step time ms (n) | GB/s | % of copy | % of in-place |", "|---|---:|---:|---:|---:|"]
        for r in group:
            if r.skipped:
                out.append(f"| {r.implementation} | skipped: {r.skipped} | | | |")
            else:
                inplace = f"{100 * r.fraction_of_inplace:.0f}%" if r.fraction_of_inplace is not None else ""
                out.append(f"| {r.implementation} | {r.ms_median:.2f} ({r.ms_min:.2f}–{r.ms_max:.2f}, {r.repeats}) | "
                           f"{r.gb_per_s:.1f} | {100 * r.fraction_of_copy:.0f}% | {inplace} |")
        ours = [r for r in group if not r.peer and not r.skipped]
        peers = [r for r in group if r.peer and not r.skipped]
        if ours and peers:
            out += ["", "| speed-up over → | " + " | ".join(p.implementation for p in peers) + " |",
                    "|---|" + "---:|" * len(peers)]
            for r in ours:
                out.append(f"| {r.implementation} | " + " | ".join(f"{p.ms_median / r.ms_median:.2f}×" for p in peers)
                           + " |")
        out.append("")
    if result.get("not_measured"):
        out += ["Not measured: " + "; ".join(f"{k} ({v})" for k, v in result["not_measured"].items()), ""]
    targets = targets_markdown(evaluate(result))
    if targets:
        out += ["Targets of the issues (fp32):", "", targets, ""]
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    """Horizontal bars of median step time per implementation, one panel per (set, dtype, optim)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Row(**r) for r in result["rows"] if not r["skipped"]]
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
