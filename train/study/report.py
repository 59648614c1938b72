"""Writes the study report: report.md, results.csv (best LR per batch × optimizer), runs.csv (every
run) and the PNG plots, all into one folder."""

from __future__ import annotations

import csv
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from train.study import analysis, plots, summary
from train.study.analysis import Cell, Record
from train.study.presets import Preset

RESULT_COLUMNS = ("optimizer", "batch", "top1", "top5", "steps", "steps_to_target", "best_lr", "lr_at_edge",
                  "lrs_tried", "wall_time_s", "images_per_s", "optimizer_share")
RUN_COLUMNS = ("key", "budget", "optimizer", "batch", "lr_factor", "lr", "top1", "top5", "steps", "epochs",
               "steps_to_target", "wall_time_s", "images_per_s", "optimizer_share", "final_w_dist",
               "final_b_simple")
PLOT_FILES = ("accuracy_vs_batch.png", "steps_to_target.png", "diffusion.png", "noise_scale.png")


def machine() -> str:
    """One line naming the machine the runs were timed on."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def _last(record: Record, metric: str) -> float | None:
    pts = analysis.curve(record, metric)
    return pts[-1][1] if pts else None


def write_csvs(records: Sequence[Record], cells: Sequence[Cell], out: Path) -> tuple[Path, Path]:
    """results.csv (one row per Cell) and runs.csv (one row per run, plan order)."""
    results, runs = out / "results.csv", out / "runs.csv"
    with results.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RESULT_COLUMNS)
        for c in cells:
            w.writerow([c.optimizer, c.batch, f"{c.top1:.4f}", f"{c.top5:.4f}", c.steps,
                        "" if c.steps_to_target is None else c.steps_to_target, f"{c.lr:.6g}", int(c.lr_at_edge),
                        c.runs, f"{c.wall_time_s:.2f}", f"{c.images_per_s:.1f}", f"{c.optimizer_share:.3f}"])
    with runs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RUN_COLUMNS)
        for r in records:
            res = r["result"]
            wd, bs = _last(r, "w_dist"), _last(r, "b_simple")
            w.writerow([r["key"], r["budget"], r["optimizer"], r["batch"], f"{r['lr_factor']:.4g}", f"{r['lr']:.6g}",
                        f"{res['top1']:.4f}", f"{res['top5']:.4f}", res["steps"], f"{res['epochs']:.3g}",
                        "" if res.get("steps_to_target") is None else res["steps_to_target"],
                        f"{res['wall_time_s']:.2f}", f"{res['images_per_s']:.1f}", f"{res['optimizer_share']:.3f}",
                        "" if wd is None else f"{wd:.5g}", "" if bs is None else f"{bs:.5g}"])
    return results, runs


def table_markdown(cells: Sequence[Cell]) -> str:
    """Batch × optimizer table: top-1 / steps / best LR per cell (* marks a best LR at the search's edge)."""
    opts, batches = analysis.optimizers_of(cells), analysis.batches_of(cells)
    by = {(c.optimizer, c.batch): c for c in cells}
    lines = ["| batch | steps | " + " | ".join(opts) + " |", "|---:|---:|" + "---|" * len(opts)]
    for b in batches:
        steps = next(by[(o, b)].steps for o in opts if (o, b) in by)
        row = []
        for o in opts:
            c = by.get((o, b))
            row.append("—" if c is None else f"{100 * c.top1:.1f}% (lr {c.lr:.3g}{'*' if c.lr_at_edge else ''})")
        lines.append(f"| {b} | {steps} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _detail_table(cells: Sequence[Cell]) -> str:
    lines = ["| optimizer | batch | top-1 | top-5 | steps | steps to target | best LR | wall s | img/s | opt. share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        stt = "—" if c.steps_to_target is None else str(c.steps_to_target)
        lines.append(f"| {c.optimizer} | {c.batch} | {100 * c.top1:.1f}% | {100 * c.top5:.1f}% | {c.steps} | {stt} | "
                     f"{c.lr:.4g} | {c.wall_time_s:.1f} | {c.images_per_s:.0f} | {100 * c.optimizer_share:.1f}% |")
    return "\n".join(lines)


def _diffusion_table(fits: Sequence[analysis.DiffusionFit]) -> str:
    lines = ["| budget | batch | steps | top-1 | ‖w_T − w_0‖ | b in a + b·ln t | R² | p in t^p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in sorted(fits, key=lambda f: (f.budget, f.batch)):
        lines.append(f"| fixed {f.budget[:-1]} | {f.batch} | {f.steps} | {100 * f.top1:.1f}% | {f.final:.4g} | "
                     f"{f.log_slope:.3g} | {f.r2_log:.3f} | {f.exponent:.3f} |")
    return "\n".join(lines)


def write_report(records: Sequence[Record], preset: Preset, out: Path, tolerance: float,
                 meta: dict[str, Any]) -> Path:
    """Write every report file into `out` and return the path of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    cells = analysis.best_cells(records)
    if not cells:
        raise ValueError("no fixed-epoch run records to report")
    write_csvs(records, cells, out)
    hold = analysis.holding(cells, tolerance)
    fall = min((h.falls_at for h in hold.values() if h.falls_at is not None), default=None)
    plots.accuracy_vs_batch(cells, out / PLOT_FILES[0], f"{preset.name} preset: {preset.epochs:g} epochs, best of "
                            f"{len(preset.lr_factors)} LRs")
    plots.steps_to_target(cells, preset.target_accuracy, out / PLOT_FILES[1])
    plots.diffusion(records, preset.diffusion_optimizer, preset.fixed_steps, out / PLOT_FILES[2])
    plots.noise_scale(records, preset.diffusion_optimizer, fall, out / PLOT_FILES[3])
    found = summary.findings(records, cells, tolerance, preset.diffusion_optimizer)
    fits = analysis.diffusion(records, preset.diffusion_optimizer)
    estimates = analysis.noise_scale(records)
    factors = ", ".join(f"{f:.3g}" for f in preset.lr_factors)
    trained_s = sum(r["result"]["wall_time_s"] for r in records)
    text = f"""# Batch-size scaling study: `{preset.name}` preset

{preset.description}. Each optimizer trains {preset.epochs:g} epochs at every global batch with the
large-batch recipe (LR scaling rule, {preset.warmup_epochs:g} warmup epochs, {preset.decay} decay
(power {preset.poly_power:g}), label smoothing {preset.label_smoothing:g}, no weight decay or adaptation on
biases and norm layers) at LR factors {factors} × its scaled LR; the table shows the best.
Accuracy "holds" while it stays within {100 * tolerance:.0f} points of the optimizer's peak.

Trained by `{meta.get("engine", "train.engine")}`.
Machine: {meta.get("machine", machine())}. {meta.get("runs", len(records))} runs
({meta.get("executed", "?")} trained by the invocation that wrote this report, {meta.get("cached", "?")} read from
the cache of earlier ones, {meta.get("jobs", 1)} at a time); training time of all runs, as each run measured
it: {trained_s:.0f} s; wall time of the invocation: {meta.get("wall_time_s", 0):.0f} s.

## Summary

{summary.summary_markdown(found)}
## Final top-1 at the best LR (batch × optimizer)

{table_markdown(cells)}

`*`: the best LR is at the edge of the searched range. Full table: [results.csv](results.csv); every run:
[runs.csv](runs.csv).

![accuracy vs batch](accuracy_vs_batch.png)

## Steps to {100 * preset.target_accuracy:.0f}% top-1

![steps to target](steps_to_target.png)

## Distance from initialisation (Hoffer et al. 2017)

{_diffusion_table(fits) if fits else "No run logged ‖w_t − w_0‖."}

![diffusion](diffusion.png)

## Gradient noise scale (McCandlish et al. 2018)

{"Median late-training B_simple per run (lr factor 1; † = the run did not reach the target): " + ", ".join(
    f"{e.optimizer}@{e.batch}: {e.b_simple:.0f}{'' if e.reached_target else '†'}" for e in estimates)
    if estimates else "No run logged B_simple."}

![noise scale](noise_scale.png)

## Per-run details (best LR)

{_detail_table(cells)}
"""
    path = out / "report.md"
    path.write_text(text)
    return path
