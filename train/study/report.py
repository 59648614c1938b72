"""Writes the study report: report.md, results.csv (best LR per batch × optimizer, with intervals),
runs.csv (every run), lr_search.csv (every LR tried per cell) and the PNG plots, all into one folder."""

from __future__ import annotations

import csv
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastlars.env import cpu_name
from train.study import analysis, plots, stats, summary, verdict
from train.study.analysis import Cell, Record
from train.study.presets import Preset
from train.study.summary import Finding, number_interval, pct_interval, points_interval

RESULT_COLUMNS = ("optimizer", "batch", "seeds", "top1_mean", "top1_low", "top1_high", "top1_runs", "top5_mean",
                  "steps", "steps_to_target", "reached", "best_lr", "lr_factor", "lrs_tried", "lr_extensions",
                  "lr_at_edge", "edge_unresolved", "wall_time_s", "images_per_s", "optimizer_share", "heldout",
                  "search_top1_mean")
RUN_COLUMNS = ("key", "budget", "phase", "optimizer", "batch", "lr_factor", "lr", "seed", "top1", "top5", "steps",
               "epochs",
               "steps_to_target", "wall_time_s", "images_per_s", "data_share", "optimizer_share", "final_w_dist",
               "final_b_simple")
SEARCH_COLUMNS = ("optimizer", "batch", "lr_factor", "lr", "seeds", "top1_mean", "top1_low", "top1_high", "best")
PLOT_FILES = ("accuracy_vs_batch.png", "steps_to_target.png", "diffusion.png", "noise_scale.png")


def machine() -> str:
    """One line naming the machine the runs were timed on."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    isa = _cpu_vector_extension()
    return (f"{cpu_name()}{f' ({isa})' if isa else ''}, {os.cpu_count()} CPU cores, {device}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def _cpu_vector_extension() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    words = set(flags.split(":", 1)[1].split())
    return "AVX-512" if "avx512f" in words else "AVX2, no AVX-512" if "avx2" in words else "no AVX2"


def _last(record: Record, metric: str) -> float | None:
    pts = analysis.curve(record, metric)
    return pts[-1][1] if pts else None


def write_csvs(records: Sequence[Record], cells: Sequence[Cell], out: Path, confidence: float) -> None:
    """results.csv (one row per Cell), runs.csv (one row per run, plan order), lr_search.csv (one row per trial)."""
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RESULT_COLUMNS)
        for c in cells:
            w.writerow([c.optimizer, c.batch, c.seeds, f"{c.top1.estimate:.4f}", f"{c.top1.low:.4f}",
                        f"{c.top1.high:.4f}", " ".join(f"{v:.4f}" for v in c.top1_runs), f"{c.top5.estimate:.4f}",
                        c.steps, "" if c.steps_to_target is None else f"{c.steps_to_target:.1f}", c.reached,
                        f"{c.lr:.6g}", f"{c.lr_factor:.6g}", len(c.factors), c.extensions, int(c.lr_at_edge),
                        int(c.edge_unresolved), f"{c.wall_time_s:.2f}", f"{c.images_per_s:.1f}",
                        f"{c.optimizer_share:.3f}", int(c.heldout), f"{c.search_top1:.4f}"])
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RUN_COLUMNS)
        for r in records:
            res = r["result"]
            wd, bs = _last(r, "w_dist"), _last(r, "b_simple")
            w.writerow([r["key"], r["budget"], analysis.phase_of(r), r["optimizer"], r["batch"],
                        f"{r['lr_factor']:.4g}", f"{r['lr']:.6g}",
                        analysis.seed_of(r), f"{res['top1']:.4f}", f"{res['top5']:.4f}", res["steps"],
                        f"{res['epochs']:.3g}", "" if res.get("steps_to_target") is None else res["steps_to_target"],
                        f"{res['wall_time_s']:.2f}", f"{res['images_per_s']:.1f}",
                        f"{res.get('data_time_share', 0.0):.3f}", f"{res['optimizer_share']:.3f}",
                        "" if wd is None else f"{wd:.5g}", "" if bs is None else f"{bs:.5g}"])
    best = {(c.optimizer, c.batch): c.lr_factor for c in cells}
    with (out / "lr_search.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SEARCH_COLUMNS)
        for t in sorted(analysis.trials(records), key=lambda t: (t.optimizer, t.batch, t.lr_factor)):
            i = stats.mean_interval(t.values("top1"), confidence)
            w.writerow([t.optimizer, t.batch, f"{t.lr_factor:.6g}", f"{t.lr:.6g}", len(t.runs), f"{i.estimate:.4f}",
                        f"{i.low:.4f}", f"{i.high:.4f}", int(best.get((t.optimizer, t.batch)) == t.lr_factor)])


def table_markdown(cells: Sequence[Cell], with_lr: bool = True, train_size: int | None = None,
                   b_simple: float | None = None) -> str:
    """Batch × optimizer table: mean top-1 ± interval half-width over seeds, best LR (with `with_lr`; † marks a
    best LR still at the edge of its range when the search stopped); with `train_size` a B/N column, with
    `b_simple` (the predicted critical batch) a B/B_simple column."""
    opts, batches = analysis.optimizers_of(cells), analysis.batches_of(cells)
    by = {(c.optimizer, c.batch): c for c in cells}
    extra = [("B/N", lambda b: f"{b / train_size:.2g}")] if train_size else []
    extra += [("B/B_simple", lambda b: f"{b / b_simple:.2g}")] if b_simple else []
    lines = ["| batch | " + "".join(f"{name} | " for name, _ in extra) + "steps | " + " | ".join(opts) + " |",
             "|---:|" + "---:|" * len(extra) + "---:|" + "---|" * len(opts)]
    for b in batches:
        steps = next(by[(o, b)].steps for o in opts if (o, b) in by)
        row = []
        for o in opts:
            c = by.get((o, b))
            if c is None:
                row.append("—")
                continue
            mark = "†" if c.edge_unresolved else ""
            row.append(pct_interval(c.top1) + (f" (lr {c.lr:.3g}{mark})" if with_lr else mark))
        lines.append(f"| {b} | " + "".join(f"{fmt(b)} | " for _, fmt in extra) + f"{steps} | " + " | ".join(row)
                     + " |")
    return "\n".join(lines)


def _verdict_table(hold: dict[str, analysis.Holding], cells: Sequence[Cell]) -> str:
    opts, batches = analysis.optimizers_of(cells), analysis.batches_of(cells)
    marks = {analysis.HOLDS: "holds", analysis.FALLS: "**falls**", analysis.UNCLEAR: "unclear"}
    lines = ["| batch | " + " | ".join(opts) + " |", "|---:|" + "---|" * len(opts)]
    for b in batches:
        row = []
        for o in opts:
            h = hold[o]
            v = next((v for v in h.verdicts if v.batch == b), None)
            if b == h.peak_batch:
                row.append("peak")
            elif v is None:
                row.append("—")
            else:
                row.append(f"{points_interval(v.difference)}: {marks[v.verdict]}")
        lines.append(f"| {b} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _detail_table(cells: Sequence[Cell]) -> str:
    lines = ["| optimizer | batch | top-1 | top-5 | per seed | steps | steps to target | best LR | LRs tried | "
             "wall s | img/s | opt. share |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        stt = (f"{c.steps_to_target:.0f}" if c.steps_to_target is not None else "—") + f" ({c.reached}/{c.seeds})"
        seeds = " ".join(f"{100 * v:.1f}" for v in c.top1_runs)
        lines.append(f"| {c.optimizer} | {c.batch} | {pct_interval(c.top1)} | {pct_interval(c.top5)} | {seeds} | "
                     f"{c.steps} | {stt} | {c.lr:.4g}{'†' if c.edge_unresolved else ''} | {len(c.factors)} "
                     f"(+{c.extensions}) | {c.wall_time_s:.1f} | {c.images_per_s:.0f} | "
                     f"{100 * c.optimizer_share:.1f}% |")
    return "\n".join(lines)


def _diffusion_table(rows: Sequence[analysis.DiffusionSummary]) -> str:
    def iv(i: analysis.Interval, digits: int) -> str:
        return number_interval(i, digits, half_digits=2)
    lines = ["| budget | batch | steps | seeds | top-1 | ‖w_T − w_0‖ | b in a + b·ln t | min R² | p in t^p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        lines.append(f"| fixed {s.budget[:-1]} | {s.batch} | {s.steps} | {len(s.fits)} | {pct_interval(s.top1)} | "
                     f"{iv(s.final, 4)} | {iv(s.log_slope, 3)} | {s.min_r2_log:.3f} | {iv(s.exponent, 3)} |")
    return "\n".join(lines)


def _noise_table(estimates: Sequence[analysis.NoiseScale]) -> str:
    groups: dict[tuple[str, int], list[analysis.NoiseScale]] = {}
    for e in estimates:
        groups.setdefault((e.optimizer, e.batch), []).append(e)
    opts = list(dict.fromkeys(e.optimizer for e in estimates))
    batches = sorted({e.batch for e in estimates})
    lines = ["| batch | " + " | ".join(opts) + " |", "|---:|" + "---|" * len(opts)]
    for b in batches:
        row = []
        for o in opts:
            g = groups.get((o, b))
            if not g:
                row.append("—")
                continue
            values = sorted(e.b_simple for e in g)
            reached = sum(e.reached_target for e in g)
            row.append(f"{statistics.median(values):.0f} ({values[0]:.0f}–{values[-1]:.0f}){'' if reached else ' †'}")
        lines.append(f"| {b} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def time_breakdown(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """Where the training time of the runs trained went (data loading, optimizer step, the rest of an
    update: forward, backward and metrics), and what the invocation's wall time held besides."""
    res = [r["result"] for r in records]
    train_s = sum(r["wall_time_s"] for r in res)
    data_s = sum(r["wall_time_s"] * r.get("data_time_share", 0.0) for r in res)
    opt_s = sum(r["wall_time_s"] * r["optimizer_share"] for r in res)
    jobs = int(meta.get("jobs", 1))
    wall = float(meta.get("wall_time_s", 0.0))
    text = (f"Training time of all {len(res)} runs, as each measured it: {train_s:.0f} s — data "
            f"{100 * data_s / train_s:.0f}%, optimizer step {100 * opt_s / train_s:.0f}%, forward, backward and "
            f"metrics {100 * (train_s - data_s - opt_s) / train_s:.0f}%."
            if train_s else "No run measured its training time.")
    if meta.get("executed") == len(res) and wall:
        rest = jobs * wall - train_s
        text += (f" The invocation trained all of them, {jobs} at a time, in {wall:.0f} s wall: of its {jobs} × "
                 f"{wall:.0f} s, {max(rest, 0):.0f} s went to evaluation, run set-up (data scan, model build), "
                 f"worker start-up, idle cores at the end and the report.")
    return text


def analyse(records: Sequence[Record], preset: Preset, tolerance: float,
            confidence: float = 0.95) -> tuple[list[Cell], list[Finding]]:
    """The best-LR cells of the records and every finding of the summary on them."""
    cells = analysis.best_cells(records, preset.lr_factors, preset.max_lr_extensions, confidence)
    if not cells:
        raise ValueError("no fixed-epoch run records to report")
    found = summary.findings(records, cells, tolerance, preset.diffusion_optimizer, confidence,
                             adaptive_labels(preset), preset.compare)
    if verdict.BASELINE in analysis.optimizers_of(cells) and len(analysis.batches_of(cells)) > 1:
        v = verdict.decide(cells, _verdict_batches(preset, cells), tolerance, confidence)
        found.insert(0, Finding("verdict", {verdict.SHOWS: True, verdict.CONTRADICTED: False}.get(v.shape),
                                verdict.headline(v)))
    return cells, found


def _verdict_batches(preset: Preset, cells: Sequence[Cell]) -> tuple[int, ...]:
    """The preset's verdict batches that were run (all of them, or the largest when none is)."""
    run = set(analysis.batches_of(cells))
    return tuple(b for b in preset.verdict_batches if b in run) or (max(run),)


def headline(cells: Sequence[Cell], found: Sequence[Finding], preset: Preset, confidence: float = 0.95) -> str:
    """The verdict and the top-1 table (percentages), as printed when the study finishes."""
    verdict = summary.summary_markdown(found, adaptive_labels(preset)).split("\n", 1)[0]
    if preset.compare is not None:
        verdict += "\n" + next(f.sentence for f in found if f.name == "{}_versus_{}".format(*preset.compare))
    return (f"{verdict}\n\nMean top-1 over the held-out seeds ± {100 * confidence:g}% half-width, best LR "
            f"(† still at an edge):\n{table_markdown(cells, with_lr=False)}")


def adaptive_labels(preset: Preset) -> tuple[str, ...]:
    """The labels of the preset's layer-wise adaptive contestants (LARS, LAMB)."""
    return tuple(o.label for o in preset.optimizers if o.optimizer in ("lars", "lamb"))


def _subset_note(preset: Preset, cells: Sequence[Cell]) -> str:
    """" This report covers ... " when the invocation narrowed the preset (--optimizers, --batches), so the
    preset's description above it is not read as what ran; "" otherwise."""
    ran, ran_batches = analysis.optimizers_of(cells), analysis.batches_of(cells)
    labels = [o.label for o in preset.optimizers]
    narrowed = set(ran) < set(labels) or (preset.batches is not None and set(ran_batches) < set(preset.batches))
    if not narrowed:
        return ""
    return (f" **This report covers part of the preset** (narrowed by --optimizers / --batches): "
            f"{', '.join(ran)} at batch {', '.join(str(b) for b in ran_batches)}.")


def write_report(records: Sequence[Record], cells: Sequence[Cell], found: Sequence[Finding], preset: Preset,
                 out: Path, tolerance: float, meta: dict[str, Any], confidence: float = 0.95) -> Path:
    """Write every report file into `out` from the records and their analysis (`analyse`) and return
    the path of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    write_csvs(records, cells, out, confidence)
    hold = analysis.holding(cells, tolerance, confidence)
    fall = min((h.falls_at for h in hold.values() if h.falls_at is not None), default=None)
    seeds = len(preset.seeds)
    plots.accuracy_vs_batch(cells, out / PLOT_FILES[0], f"{preset.name}: {preset.epochs:g} epochs, best LR, "
                            f"mean ± {100 * confidence:g}% CI over the held-out seeds")
    plots.steps_to_target(cells, records, preset.target_accuracy, out / PLOT_FILES[1])
    plots.diffusion(records, preset.diffusion_optimizer, preset.fixed_steps, out / PLOT_FILES[2])
    plots.noise_scale(records, preset.diffusion_optimizer, fall, out / PLOT_FILES[3])
    adaptive = adaptive_labels(preset)
    diffusion_rows = analysis.diffusion_by_batch(analysis.diffusion(records, preset.diffusion_optimizer), confidence)
    estimates = analysis.noise_scale(records)
    factors = ", ".join(f"{f:.3g}" for f in preset.lr_factors)
    rules = {"linear": "B", "sqrt": "√B", "none": "1"}
    recipes = "; ".join(f"{o.label}: lr ∝ {rules[o.lr_scaling]}"
                        + (", warmup growing as √B (MLPerf LARS shape)" if o.warmup == "sqrt" else "")
                        for o in preset.optimizers)
    conf = f"{100 * confidence:g}%"
    critical = analysis.predicted_critical_batch(estimates)
    if verdict.BASELINE in analysis.optimizers_of(cells) and len(analysis.batches_of(cells)) > 1:
        verdict_table = verdict.table(verdict.decide(cells, _verdict_batches(preset, cells), tolerance, confidence))
    else:
        verdict_table = "No verdict: it needs momentum SGD and at least two batches."
    if preset.heldout:
        counts = ", ".join(f"{n} at B ≥ {b}" for b, n in preset.heldout)
        heldout_text = (f"every reported number and every test comes from fresh seeds trained at the chosen LR only "
                        f"({counts}; seeds from {max(preset.seeds) + 1} on), so the choice of the LR does not "
                        f"flatter the numbers reported.")
    else:
        heldout_text = ("this preset has no held-out seeds: the numbers reported are those the LR was chosen on, "
                        "which flatters them slightly.")
    if preset.folds:
        heldout_text += (f" Run seed s trains and validates on stratified cross-validation fold s mod {preset.folds} "
                         f"of the digits, so the held-out seeds between them validate on every image.")
    subset = _subset_note(preset, cells)
    text = f"""# Batch-size scaling study: `{preset.name}` preset

{preset.description}.{subset} Each optimizer trains {preset.epochs:g} epochs of samples at every global batch B
(round(epochs · N / B) updates, the same number of images at every batch) with the
large-batch recipe ({preset.warmup_epochs:g} warmup epochs, {preset.decay} decay (power {preset.poly_power:g}),
label smoothing {preset.label_smoothing:g}, no weight decay or adaptation on biases and norm layers; {recipes}),
once per seed (a seed sets the initialisation, the data order{" and the fold" if preset.folds else ""}).

**LR search.** Per (optimizer, batch) the LR factors start at {factors} × the scaled LR, a log grid of
step {preset.lr_step:g}; while the best mean top-1 over seeds lies at the lowest or highest factor tried,
the next factor beyond it is tried too, up to {preset.max_lr_extensions} extensions per cell. Every
table shows the best factor's runs († where the best is still at an edge when the limit is reached).
Every LR tried: [lr_search.csv](lr_search.csv).

**Held-out seeds.** The LR search chooses on its {seeds} search seeds ({", ".join(map(str, preset.seeds))});
{heldout_text}

**Statistics.** Every ± is the half-width of a two-sided {conf} Student t interval over seeds; a
difference is Welch's interval (Welch–Satterthwaite degrees of freedom). The verdict is the
pre-registered rule below (train/study/verdict.py), applied to the held-out numbers. The limit
ranges further down ("holds"/"falls" against the peak, tolerance {100 * tolerance:g} points) are kept
as description only: at each batch B beyond an optimizer's peak batch B* (highest mean top-1),
accuracy **holds** when the whole interval of top-1(B) − top-1(B*) lies above −{100 * tolerance:g}
points, **falls** when it lies wholly below, and is **unclear** otherwise.

Trained by `{meta.get("engine", "train.engine")}`. Machine: {meta.get("machine", machine())}.
{meta.get("runs", len(records))} runs ({meta.get("initial_runs", "?")} planned at the start, the rest added by the LR
search; {meta.get("executed", "?")} trained by the invocation that wrote this report, {meta.get("cached", "?")} read
from the cache of earlier ones, {meta.get("jobs", 1)} at a time); wall time of the invocation:
{meta.get("wall_time_s", 0):.0f} s. {time_breakdown(records, meta)}

## Summary

{summary.summary_markdown(found, adaptive)}
## Pre-registered verdict

{verdict.rule_text(analysis.batches_of(cells), _verdict_batches(preset, cells), analysis.optimizers_of(cells),
                   tolerance, confidence)}

{verdict_table}

## Final top-1 at the best LR (batch × optimizer; mean ± {conf} half-width over the held-out seeds)

{table_markdown(cells, train_size=meta.get("train_size"), b_simple=critical.median if critical else None)}

B/N: the batch as a fraction of the training set; B/B_simple: the batch over the predicted critical batch
(median late-training B_simple, McCandlish et al. 2018, arXiv:1812.06162).

Full table: [results.csv](results.csv); every run: [runs.csv](runs.csv).

![accuracy vs batch](accuracy_vs_batch.png)

## Does accuracy hold? (top-1 minus the peak's, {conf} interval; tolerance {100 * tolerance:g} points)

{_verdict_table(hold, cells)}

## Steps to {100 * preset.target_accuracy:.0f}% top-1 (mean over seeds, where every seed reached it)

![steps to target](steps_to_target.png)

## Distance from initialisation (Hoffer et al. 2017; mean ± {conf} half-width over seeds)

{_diffusion_table(diffusion_rows) if diffusion_rows else "No run logged ‖w_t − w_0‖."}

![diffusion](diffusion.png)

## Gradient noise scale (McCandlish et al. 2018)

{f"Median late-training B_simple of each of {preset.diffusion_optimizer}'s fixed-epoch runs at the scaled LR (the "
 "runs that measure it), per batch the median over seeds and the range († = no seed reached the target):"
 + chr(10) + chr(10) + _noise_table(estimates) if estimates else "No run logged B_simple."}

![noise scale](noise_scale.png)

## Per-cell details (best LR)

{_detail_table(cells)}
"""
    path = out / "report.md"
    path.write_text(text)
    return path
