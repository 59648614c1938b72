"""The study's PNG figures, drawn from run records and the analysis (matplotlib, Agg backend).

Each function writes one file and returns its path:
- accuracy_vs_batch.png: best-LR final top-1 against global batch (log₂ x), one line per optimizer;
- steps_to_target.png: steps to the target accuracy against batch (log-log), with each optimizer's
  perfect-scaling line S(B₀)·B₀/B dashed;
- diffusion.png: ‖w_t − w_0‖ against step (log x), one curve per batch, fixed-epoch and fixed-step panels;
- noise_scale.png: EMA-smoothed B_simple against step per batch, with the batch where accuracy first
  falls drawn as a horizontal line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from train.study import analysis
from train.study.analysis import Cell, Record

DPI = 90


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def accuracy_vs_batch(cells: Sequence[Cell], path: Path, title: str) -> Path:
    """Final top-1 (best LR) against batch per optimizer."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for opt in analysis.optimizers_of(cells):
        row = sorted((c for c in cells if c.optimizer == opt), key=lambda c: c.batch)
        ax.plot([c.batch for c in row], [100 * c.top1 for c in row], marker="o", label=opt)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("final top-1 (%) at best LR")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def steps_to_target(cells: Sequence[Cell], target: float, path: Path) -> Path:
    """Steps to target against batch with the perfect-scaling line of each optimizer."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, opt in enumerate(analysis.optimizers_of(cells)):
        color = f"C{i}"
        points = analysis.target_scaling(cells, opt)
        reached = [p for p in points if p.steps is not None]
        if not reached:
            continue
        ax.plot([p.batch for p in reached], [p.steps for p in reached], marker="o", color=color, label=opt)
        perfect = [p for p in points if p.perfect is not None]
        ax.plot([p.batch for p in perfect], [p.perfect for p in perfect], linestyle="--", color=color, alpha=0.5)
    ax.plot([], [], linestyle="--", color="gray", label="perfect scaling")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"steps to {100 * target:.0f}% top-1")
    ax.set_title("steps to target vs batch (dashed: perfect scaling)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def diffusion(records: Sequence[Record], optimizer: str, fixed_steps: int, path: Path) -> Path:
    """‖w_t − w_0‖ against step (log x) per batch, for the fixed-epoch and fixed-step budgets."""
    runs = analysis.diffusion_runs(records, optimizer)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    batches = sorted({r["batch"] for rs in runs.values() for r in rs})
    cmap = plt.get_cmap("viridis")
    colors = {b: cmap(i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}
    titles = {"epochs": "fixed epoch budget", "steps": f"fixed step budget ({fixed_steps} steps)"}
    for ax, budget in zip(axes, ("epochs", "steps")):
        for r in runs[budget]:
            pts = analysis.curve(r, "w_dist")
            ax.plot([t for t, _ in pts], [d for _, d in pts], color=colors[r["batch"]], label=f"B={r['batch']}")
        ax.set_xscale("log")
        ax.set_xlabel("step t")
        ax.set_title(f"{optimizer}: {titles[budget]}")
        ax.grid(True, which="both", alpha=0.3)
        if runs[budget]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("‖w_t − w_0‖")
    return _save(fig, path)


def noise_scale(records: Sequence[Record], optimizer: str, fall_batch: int | None, path: Path) -> Path:
    """B_simple over training per batch (the diffusion optimizer's scaled-LR runs) and the batch where
    accuracy first falls."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = [r for r in analysis.epoch_records(records) if r["optimizer"] == optimizer and r["lr_factor"] == 1.0]
    cmap = plt.get_cmap("viridis")
    rows.sort(key=lambda r: r["batch"])
    plotted = False
    for i, r in enumerate(rows):
        pts = [(t, v) for t, v in analysis.curve(r, "b_simple") if v > 0]
        if pts:
            plotted = True
            ax.plot([t for t, _ in pts], [v for _, v in pts], color=cmap(i / max(1, len(rows) - 1)),
                    label=f"B={r['batch']}")
    if fall_batch is not None:
        ax.axhline(fall_batch, color="red", linestyle="--", label=f"accuracy falls at B={fall_batch}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("B_simple (EMA)")
    ax.set_title(f"gradient noise scale ({optimizer})" + ("" if plotted else ": not measured"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
