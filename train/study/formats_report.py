"""Writes the state-formats report (train.study.formats): report.md, formats.json (every comparison and
verdict), results.csv (one row per optimizer × batch × state format), runs.csv (every run) and the
plots difference_vs_batch.png and accuracy_vs_batch.png, all into one folder."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastlars.backends.quantization import SIGNED_MAP, UNSIGNED_MAP
from train.study import formats, plots
from train.study.analysis import Record, epoch_records, seed_of
from train.study.formats import Comparison
from train.study.presets import Preset
from train.study.report import machine
from train.study.summary import pct_interval, points_interval

RESULT_COLUMNS = ("optimizer", "batch", "state", "lr", "seeds", "top1_mean", "top1_low", "top1_high", "fp32_top1_mean",
                  "fp32_top1_low", "fp32_top1_high", "difference", "difference_low", "difference_high", "verdict",
                  "excludes_zero", "optimizer_share", "fp32_optimizer_share")
RUN_COLUMNS = ("key", "optimizer", "state", "batch", "lr", "seed", "top1", "top5", "steps", "wall_time_s",
               "optimizer_share")
PLOT_FILES = ("difference_vs_batch.png", "accuracy_vs_batch.png")


def _row(c: Comparison) -> list[Any]:
    return [c.optimizer, c.batch, c.state, f"{c.lr:.6g}", c.seeds,
            *(f"{v:.4f}" for v in (c.top1.estimate, c.top1.low, c.top1.high, c.fp32_top1.estimate, c.fp32_top1.low,
                                   c.fp32_top1.high, c.difference.estimate, c.difference.low, c.difference.high)),
            c.verdict, int(c.excludes_zero), f"{c.optimizer_share:.3f}", f"{c.fp32_optimizer_share:.3f}"]


def write_csvs(records: Sequence[Record], comparisons: Sequence[Comparison], out: Path) -> None:
    """results.csv (one row per Comparison) and runs.csv (one row per run, plan order)."""
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RESULT_COLUMNS)
        w.writerows(_row(c) for c in comparisons)
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RUN_COLUMNS)
        for r in epoch_records(records):
            res = r["result"]
            w.writerow([r.get("key", ""), formats.optimizer_of(r), formats.state_of(r), r["batch"], f"{r['lr']:.6g}",
                        seed_of(r), f"{res['top1']:.4f}", f"{res['top5']:.4f}", res["steps"],
                        f"{res['wall_time_s']:.2f}", f"{res['optimizer_share']:.3f}"])


def table_markdown(comparisons: Sequence[Comparison], margin: float) -> str:
    """One row per optimizer × batch: fp32 top-1, then per state its top-1, the paired difference and verdict."""
    states = list(dict.fromkeys(c.state for c in comparisons))
    head = ["optimizer", "batch", "seeds", "fp32 top-1"]
    for s in states:
        head += [f"{s} top-1", f"{s} − fp32 (points)", f"{s} verdict"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|" + "---:|---:|---|" * len(states)]
    cells: dict[tuple[str, int], dict[str, Comparison]] = {}
    for c in comparisons:
        cells.setdefault((c.optimizer, c.batch), {})[c.state] = c
    for (optimizer, batch), by_state in cells.items():
        first = next(iter(by_state.values()))
        row = [optimizer, str(batch), str(first.seeds), pct_interval(first.fp32_top1)]
        for s in states:
            c = by_state.get(s)
            if c is None:
                row += ["–", "–", "–"]
                continue
            star = "*" if c.excludes_zero else ""
            row += [pct_interval(c.top1), points_interval(c.difference).removesuffix(" points") + star,
                    formats.verdict_sentence(s, c.verdict, margin) if c.verdict != formats.CANNOT_TELL
                    else "cannot tell"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict_markdown(comparisons: Sequence[Comparison], margin: float) -> str:
    """Per state format, the verdict per batch over the optimizers."""
    states = list(dict.fromkeys(c.state for c in comparisons))
    batches = sorted({c.batch for c in comparisons})
    lines = ["| state | " + " | ".join(f"B = {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for s in states:
        verdicts = formats.batch_verdicts(comparisons, s)
        lines.append(f"| {s} | " + " | ".join(formats.verdict_sentence(s, verdicts[b], margin) if b in verdicts
                                              else "–" for b in batches) + " |")
    return "\n".join(lines)


def time_by_state(records: Sequence[Record]) -> str:
    """Median wall time of a run and its optimizer share, per optimizer and state format (medians: a run
    paused or slowed by other work on the machine moves a mean, not them)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in epoch_records(records):
        groups.setdefault((formats.optimizer_of(r), formats.state_of(r)), []).append(r["result"])
    parts = [f"{opt} {state}: {statistics.median(x['wall_time_s'] for x in res):.1f} s a run, optimizer step "
             f"{100 * statistics.median(x['optimizer_share'] for x in res):.0f}% of it"
             for (opt, state), res in sorted(groups.items())]
    return "; ".join(parts)


def headline(comparisons: Sequence[Comparison], margin: float = formats.MARGIN) -> str:
    """The verdicts per state and batch, as printed when the study finishes."""
    return "Verdict per batch (paired intervals over seeds):\n" + verdict_markdown(comparisons, margin)


def write_report(records: Sequence[Record], preset: Preset, out: Path, meta: dict[str, Any],
                 margin: float = formats.MARGIN, confidence: float = 0.95) -> Path:
    """Write every report file into `out` and return the path of report.md."""
    comparisons = formats.compare(records, margin, confidence)
    if not comparisons:
        raise ValueError("no fp32 and low-precision runs of the same optimizer, batch and seed to compare")
    out.mkdir(parents=True, exist_ok=True)
    write_csvs(records, comparisons, out)
    conf = f"{100 * confidence:g}%"
    plots.state_differences(comparisons, margin, out / PLOT_FILES[0],
                            f"{preset.name}: state format − fp32 top-1, paired {conf} CI over seeds")
    plots.state_accuracy(records, out / PLOT_FILES[1], f"{preset.name}: final top-1 by state format "
                         f"(mean ± {conf} CI over seeds)", confidence)
    states = list(dict.fromkeys(c.state for c in comparisons))
    payload = {
        "preset": preset.name, "margin": margin, "confidence": confidence, "reference": formats.REFERENCE,
        "optim_state_min_size": preset.optim_state_min_size,
        "batch_verdicts": {s: {str(b): v for b, v in formats.batch_verdicts(comparisons, s).items()} for s in states},
        "comparisons": [c.as_dict() for c in comparisons],
        "meta": meta,
    }
    (out / "formats.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    lrs = ", ".join(f"{o} B={b}: ×{f:.3g}" for o, b, f in preset.fixed_lr_factors)
    counts = ", ".join(f"{n} at B ≥ {b}" for b, n in preset.heldout)
    min_size = ("the trainer's default (4096)" if preset.optim_state_min_size is None
                else f"{preset.optim_state_min_size}")
    text = f"""# Optimizer state formats: `{preset.name}` preset

{preset.description}. Each contestant trains {preset.epochs:g} epochs of samples at every global batch B with
the default preset's recipe ({preset.warmup_epochs:g} warmup epochs, {preset.decay} decay, label smoothing
{preset.label_smoothing:g}, biases and norm layers without decay or adaptation).

**State formats.** fp32: fastlars' full-precision state. bf16: moments (LAMB) or momentum (LARS) stored in
bf16. int8: blockwise 8-bit codes with an fp32 scale per block (fastlars.backends.quantization, code maps
{SIGNED_MAP.name} for m and momentum, {UNSIGNED_MAP.name} for v). The
low-precision formats apply to every adapting weight of at least {min_size} elements: the small CNN's
adapting weights have 432, 4,608 and 320 elements, so the library's default of 4096 would quantise only one
of the three, and {min_size} quantises all of them (biases and BatchNorm parameters keep fp32 state). An int8
block never spans two dim-0 rows, so here every block is one output channel's row of 27, 144 or 32 elements
with its own scale: finer than the 256-element blocks of a large layer's rows, which favours int8. Every
run steps with `backend="auto"`: the native CPU kernels where built, for every format (their low-precision
path matches the quantisation-aware reference, tests/test_native_lowbit.py), else the reference.

**LRs and seeds.** No LR search: every state format trains at the LR factor the default preset's search chose
for fp32 (fixed from its committed report, train/study/results/default/results.csv: {lrs}), on the
default's held-out seeds ({counts}; seeds from {max(preset.seeds) + 1} on; seed s validates on fold
s mod {preset.folds}). A seed fixes the initialisation, the data order and the fold, so the runs of one
optimizer and batch on one seed differ only in the state format, and the differences are **paired**.

**Statistics and verdict** (stated before the run; train/study/formats.py). Per optimizer, batch and
format F, d_s = top-1_F(s) − top-1_fp32(s) over the seeds, and the {conf} paired t interval of mean(d_s).
"F within {100 * margin:g} point of fp32" when the whole interval lies inside ±{100 * margin:g} point;
"differs" when it lies wholly beyond +{100 * margin:g} or −{100 * margin:g} point; "cannot tell" otherwise. Per
batch over both optimizers: within when both are, differs when either does, else cannot tell. An * marks
an interval that excludes 0 (a detectable difference, whatever its size). No correction for the
{len(comparisons)} intervals taken together.

Trained by `{meta.get("engine", "train.engine")}`. Machine: {meta.get("machine", machine())}.
{meta.get("runs", len(records))} runs ({meta.get("executed", "?")} trained by the invocation that wrote this
report, {meta.get("cached", "?")} read from the cache of earlier ones, {meta.get("jobs", 1)} at a time); wall
time of the invocation: {meta.get("wall_time_s", 0):.0f} s. Per optimizer and state (medians, timed while the
machine was shared): {time_by_state(records)}.

## Verdict per batch

{verdict_markdown(comparisons, margin)}

## Top-1 and the paired difference to fp32 (mean ± {conf} half-width; difference [{conf} interval] in points)

{table_markdown(comparisons, margin)}

Every comparison: [results.csv](results.csv), [formats.json](formats.json); every run: [runs.csv](runs.csv).

![difference vs batch](difference_vs_batch.png)

![accuracy vs batch](accuracy_vs_batch.png)
"""
    path = out / "report.md"
    path.write_text(text)
    return path
