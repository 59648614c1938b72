"""The study's PNG figures, drawn from run records and the analysis (matplotlib, Agg backend).

Each function writes one file and returns its path:
- accuracy_vs_batch.png: best-LR mean final top-1 against global batch (log₂ x), one line per
  optimizer, error bars the interval over seeds;
- steps_to_target.png: mean steps to the target accuracy against batch (log-log), error bars the
  range over seeds, with each optimizer's perfect-scaling line S(B₀)·B₀/B dashed;
- diffusion.png: ‖w_t − w_0‖ against step (log x), per batch the mean over seeds with the band
  between the smallest and largest seed, fixed-epoch and fixed-step panels;
- noise_scale.png: EMA-smoothed B_simple against step per batch, mean over seeds with a min–max band,
  with the batch where accuracy first surely falls drawn as a horizontal line;
- difference_vs_batch.png, accuracy_vs_batch.png of the state-formats preset (state_differences,
  state_accuracy): the paired top-1 difference to fp32 state, and top-1 per state format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from train.study import analysis, formats, stats
from train.study.analysis import Cell, Record

DPI = 90


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def accuracy_vs_batch(cells: Sequence[Cell], path: Path, title: str) -> Path:
    """Mean final top-1 (best LR) against batch per optimizer, with the intervals as error bars (an
    unbounded interval, from a single seed, draws none)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, opt in enumerate(analysis.optimizers_of(cells)):
        row = sorted((c for c in cells if c.optimizer == opt), key=lambda c: c.batch)
        mean = [100 * c.top1.estimate for c in row]
        low = [0.0 if math.isinf(c.top1.low) else 100 * (c.top1.estimate - c.top1.low) for c in row]
        high = [0.0 if math.isinf(c.top1.high) else 100 * (c.top1.high - c.top1.estimate) for c in row]
        # neighbouring optimizers' bars sit side by side instead of on top of each other
        shift = 2 ** ((i - (len(analysis.optimizers_of(cells)) - 1) / 2) * 0.04)
        ax.errorbar([c.batch * shift for c in row], mean, yerr=[low, high], marker="o", capsize=3, label=opt)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("final top-1 (%) at best LR")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def steps_to_target(cells: Sequence[Cell], records: Sequence[Record], target: float, path: Path) -> Path:
    """Mean steps to target against batch (range over seeds as error bars) with the perfect-scaling line
    of each optimizer."""
    by_key = {r["key"]: r for r in records}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, opt in enumerate(analysis.optimizers_of(cells)):
        color = f"C{i}"
        points = analysis.target_scaling(cells, opt)
        row = {c.batch: c for c in cells if c.optimizer == opt}
        reached = [p for p in points if p.steps is not None]
        if not reached:
            continue
        spans = []
        for p in reached:
            values = [by_key[k]["result"]["steps_to_target"] for k in row[p.batch].keys]
            spans.append((p.steps - min(values), max(values) - p.steps))
        ax.errorbar([p.batch for p in reached], [p.steps for p in reached], yerr=list(zip(*spans)), marker="o",
                    capsize=3, color=color, label=opt)
        perfect = [p for p in points if p.perfect is not None]
        ax.plot([p.batch for p in perfect], [p.perfect for p in perfect], linestyle="--", color=color, alpha=0.5)
    ax.plot([], [], linestyle="--", color="gray", label="perfect scaling")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"steps to {100 * target:.0f}% top-1")
    ax.set_title("steps to target vs batch (mean, range over seeds; dashed: perfect scaling)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _bands(ax: plt.Axes, runs: Sequence[Record], metric: str, colors: dict[int, Any], positive: bool = False) -> bool:
    """One mean curve per batch over its runs (seeds) with a min–max band; whether anything was drawn."""
    drawn = False
    for batch in sorted({r["batch"] for r in runs}):
        points = analysis.band([r for r in runs if r["batch"] == batch], metric)
        if positive:
            points = [p for p in points if p[2] > 0]
        if not points:
            continue
        drawn = True
        steps = [p[0] for p in points]
        ax.plot(steps, [p[1] for p in points], color=colors[batch], label=f"B={batch}")
        ax.fill_between(steps, [p[2] for p in points], [p[3] for p in points], color=colors[batch], alpha=0.2,
                        linewidth=0)
    return drawn


def _batch_colors(batches: Sequence[int]) -> dict[int, Any]:
    cmap = plt.get_cmap("viridis")
    ordered = sorted(set(batches))
    return {b: cmap(i / max(1, len(ordered) - 1)) for i, b in enumerate(ordered)}


def diffusion(records: Sequence[Record], optimizer: str, fixed_steps: int, path: Path) -> Path:
    """‖w_t − w_0‖ against step (log x) per batch, mean over seeds with a min–max band, for the
    fixed-epoch and fixed-step budgets."""
    runs = analysis.diffusion_runs(records, optimizer)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    colors = _batch_colors([r["batch"] for rs in runs.values() for r in rs])
    titles = {"epochs": "fixed epoch budget", "steps": f"fixed step budget ({fixed_steps} steps)"}
    for ax, budget in zip(axes, ("epochs", "steps")):
        drawn = _bands(ax, runs[budget], "w_dist", colors)
        ax.set_xscale("log")
        ax.set_xlabel("step t")
        ax.set_title(f"{optimizer}: {titles[budget]}")
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("‖w_t − w_0‖ (mean, min–max over seeds)")
    return _save(fig, path)


def noise_scale(records: Sequence[Record], optimizer: str, fall_batch: int | None, path: Path) -> Path:
    """B_simple over training per batch (the diffusion optimizer's scaled-LR runs; mean over seeds with a
    min–max band) and the batch where accuracy first surely falls."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = [r for r in analysis.epoch_records(records) if r["optimizer"] == optimizer and r["lr_factor"] == 1.0]
    plotted = _bands(ax, rows, "b_simple", _batch_colors([r["batch"] for r in rows]), positive=True)
    if fall_batch is not None:
        ax.axhline(fall_batch, color="red", linestyle="--", label=f"accuracy first surely falls at B={fall_batch}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("B_simple (EMA; mean, min–max over seeds)")
    ax.set_title(f"gradient noise scale ({optimizer})" + ("" if plotted else ": not measured"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def state_differences(comparisons: Sequence[formats.Comparison], margin: float, path: Path, title: str) -> Path:
    """Top-1 of each low-precision state format minus fp32's (points) against batch, one line per optimizer
    and format, error bars the paired interval (none where unbounded), the ±margin band shaded."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = list(dict.fromkeys((c.optimizer, c.state) for c in comparisons))
    for i, (optimizer, state) in enumerate(series):
        row = sorted((c for c in comparisons if (c.optimizer, c.state) == (optimizer, state)), key=lambda c: c.batch)
        mean = [100 * c.difference.estimate for c in row]
        low = [0.0 if math.isinf(c.difference.low) else mean[j] - 100 * c.difference.low for j, c in enumerate(row)]
        high = [0.0 if math.isinf(c.difference.high) else 100 * c.difference.high - mean[j] for j, c in enumerate(row)]
        shift = 2 ** ((i - (len(series) - 1) / 2) * 0.04)
        ax.errorbar([c.batch * shift for c in row], mean, yerr=[low, high], marker="o", capsize=3,
                    label=f"{optimizer} {state}")
    ax.axhspan(-100 * margin, 100 * margin, color="0.85", zorder=0, label=f"±{100 * margin:g} point")
    ax.axhline(0.0, color="0.4", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("top-1 difference to fp32 state (points)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def state_accuracy(records: Sequence[Record], path: Path, title: str, confidence: float = 0.95) -> Path:
    """Mean final top-1 against batch per optimizer and state format, error bars the t interval over seeds."""
    groups: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in analysis.epoch_records(records):
        key = (formats.optimizer_of(r), formats.state_of(r))
        groups.setdefault(key, {}).setdefault(int(r["batch"]), []).append(100 * float(r["result"]["top1"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, ((optimizer, state), by_batch) in enumerate(sorted(groups.items())):
        batches = sorted(by_batch)
        intervals = [stats.mean_interval(by_batch[b], confidence) for b in batches]
        mean = [iv.estimate for iv in intervals]
        err = [0.0 if math.isinf(iv.half_width) else iv.half_width for iv in intervals]
        shift = 2 ** ((i - (len(groups) - 1) / 2) * 0.03)
        ax.errorbar([b * shift for b in batches], mean, yerr=err, marker="o", capsize=3, label=f"{optimizer} {state}",
                    linestyle="-" if state == formats.REFERENCE else "--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("final top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
