"""The study's statistics on made-up results whose answers are known: t intervals (checked against
SciPy's own tests), the holds decision and its "cannot tell", the LR search's grid extension, and the
sweep that runs the search to its end with a stand-in trainer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats

from train.study import analysis, search, stats, summary
from train.study.analysis import Cell
from train.study.cache import ResultCache
from train.study.presets import PRESETS, Preset
from train.study.sweep import Engine, execute, lr_search, plan_runs

# ---------------------------------------------------------------- intervals


def test_mean_and_difference_intervals_match_scipy() -> None:
    a, b = [0.91, 0.93, 0.96, 0.92], [0.88, 0.95, 0.90]
    mine = stats.difference_interval(a, b, 0.95)
    theirs = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (mine.low, mine.high) == pytest.approx((theirs.low, theirs.high), rel=1e-12)
    assert mine.estimate == pytest.approx(sum(a) / 4 - sum(b) / 3) and mine.n == 7
    one = stats.mean_interval(a, 0.9)
    theirs = scipy_stats.ttest_1samp(a, 0.0).confidence_interval(0.9)
    assert (one.low, one.high) == pytest.approx((theirs.low, theirs.high), rel=1e-12)


def test_contrast_of_four_groups_by_hand() -> None:
    groups = [[1.0, 2.0], [2.0, 4.0, 6.0], [0.0, 1.0], [3.0, 3.5]]
    weights = [1.0, -1.0, -1.0, 1.0]
    got = stats.contrast_interval(groups, weights, 0.95)
    means = [1.5, 4.0, 0.5, 3.25]
    terms = [0.5 / 2, 4.0 / 3, 0.5 / 2, 0.125 / 2]  # s²/n per group
    se2 = sum(terms)
    dof = se2**2 / sum(t * t / (len(g) - 1) for t, g in zip(terms, groups))
    half = scipy_stats.t.ppf(0.975, dof) * math.sqrt(se2)
    estimate = means[0] - means[1] - means[2] + means[3]
    assert (got.estimate, got.low, got.high) == pytest.approx((estimate, estimate - half, estimate + half))


def test_degenerate_intervals() -> None:
    point = stats.mean_interval([0.1, 0.1, 0.1])  # no spread: the point itself
    assert point.low == point.estimate == point.high == pytest.approx(0.1) and point.n == 3
    single = stats.mean_interval([0.5])
    assert single.low == -math.inf and single.high == math.inf  # one seed: no variance estimate
    half = stats.difference_interval([0.2, 0.2], [0.5, 0.7])  # one constant group: the other's spread only
    assert half.half_width == pytest.approx(scipy_stats.t.ppf(0.975, 1) * math.sqrt(0.02 / 2))
    for bad in (dict(groups=[[1.0]], weights=[1.0, 2.0]), dict(groups=[[]], weights=[1.0])):
        with pytest.raises(ValueError):
            stats.contrast_interval(**bad)
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_interval([1.0, 2.0], confidence=1.0)


def test_versus_margin_and_quartiles() -> None:
    assert stats.versus_margin(stats.Interval(0, 0.5, 1.0, 3), 0.2) == stats.ABOVE
    assert stats.versus_margin(stats.Interval(0, -1.0, -0.5, 3), 0.2) == stats.BELOW
    assert stats.versus_margin(stats.Interval(0, -1.0, 1.0, 3), 0.2) == stats.UNCLEAR
    assert stats.quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (2.0, 3.0, 4.0)
    assert stats.quartiles([7.0]) == (7.0, 7.0, 7.0)


# ---------------------------------------------------------------- the LR search's rule


def scores(*pairs: tuple[float, float]) -> list[search.FactorScore]:
    return [search.FactorScore(f, top1, 0.99) for f, top1 in pairs]


def test_next_factor_extends_beyond_the_best_edge_until_inside_or_spent() -> None:
    grid = (1 / 3, 1.0, 3.0)
    assert search.next_factor(scores((1 / 3, 0.9), (1, 0.8), (3, 0.7)), grid, 3.0, 2) == pytest.approx(1 / 9)
    assert search.next_factor(scores((1 / 3, 0.7), (1, 0.8), (3, 0.9)), grid, 3.0, 2) == pytest.approx(9.0)
    assert search.next_factor(scores((1 / 3, 0.7), (1, 0.9), (3, 0.8)), grid, 3.0, 2) is None
    spent = scores((1 / 27, 0.95), (1 / 9, 0.9), (1 / 3, 0.9), (1, 0.8), (3, 0.7))
    assert search.extensions_used([s.factor for s in spent], grid) == 2
    assert search.next_factor(spent, grid, 3.0, 2) is None
    assert search.next_factor(spent, grid, 3.0, 3) == pytest.approx(1 / 81)
    assert search.next_factor(scores((1 / 3, 0.9), (1, 0.8), (3, 0.7)), grid, 3.0, 0) is None


def test_best_breaks_ties_by_top5_then_the_smaller_lr() -> None:
    tied = [search.FactorScore(1.0, 0.9, 0.98), search.FactorScore(3.0, 0.9, 0.99), search.FactorScore(0.5, 0.8, 1)]
    assert search.best(tied).factor == 3.0
    assert search.best([search.FactorScore(3.0, 0.9, 0.99), search.FactorScore(1.0, 0.9, 0.99)]).factor == 1.0
    assert search.edge(tied) == search.HIGH


# ---------------------------------------------------------------- holds / falls / cannot tell


def cell(optimizer: str, batch: int, runs: list[float]) -> Cell:
    return Cell(optimizer=optimizer, batch=batch, lr=0.1, lr_factor=1.0, factors=(1 / 3, 1.0, 3.0), extensions=0,
                lr_edge="", edge_unresolved=False, top1=stats.mean_interval(runs), top5=stats.mean_interval(runs),
                top1_runs=tuple(runs), steps=10, steps_to_target=None, reached=0, seeds=len(runs), wall_time_s=1.0,
                images_per_s=1.0, optimizer_share=0.1, keys=tuple(f"{optimizer}{batch}{i}" for i in range(len(runs))))


# sgd: holds at 64 for sure, falls at 128 for sure. lamb: 64 is noisy (unclear), 128 holds, 256 falls.
# lars: holds through the largest batch. adamw: nothing beyond the peak is decided.
TABLE = {
    "sgd": {32: [0.960, 0.961, 0.959], 64: [0.958, 0.960, 0.959], 128: [0.900, 0.905, 0.895],
            256: [0.600, 0.610, 0.590]},
    "lamb": {32: [0.950, 0.951, 0.949], 64: [0.960, 0.880, 0.990], 128: [0.948, 0.950, 0.949],
             256: [0.700, 0.710, 0.690]},
    "lars": {32: [0.940, 0.941, 0.939], 64: [0.941, 0.940, 0.942], 128: [0.939, 0.940, 0.938],
             256: [0.938, 0.940, 0.939]},
    "adamw": {32: [0.950, 0.951, 0.949], 64: [0.960, 0.700, 0.990], 128: [0.950, 0.700, 0.990],
              256: [0.960, 0.690, 0.980]},
}


def cells_of(table: dict[str, dict[int, list[float]]]) -> list[Cell]:
    return [cell(opt, b, runs) for opt, row in table.items() for b, runs in row.items()]


def test_holding_decides_holds_falls_and_unclear() -> None:
    hold = analysis.holding(cells_of(TABLE), tolerance=0.02)
    sgd, lamb, lars, adamw = hold["sgd"], hold["lamb"], hold["lars"], hold["adamw"]
    assert (sgd.peak_batch, sgd.holds_to, sgd.could_hold_to, sgd.falls_at) == (32, 64, 64, 128) and sgd.settled
    assert [v.verdict for v in sgd.verdicts] == [analysis.HOLDS, analysis.FALLS, analysis.FALLS]
    # lamb: the noisy 64 is unclear, so it holds for certain only at its peak, and at most up to 128
    assert (lamb.peak_batch, lamb.holds_to, lamb.could_hold_to, lamb.falls_at) == (32, 32, 128, 256)
    assert [v.verdict for v in lamb.verdicts] == [analysis.UNCLEAR, analysis.HOLDS, analysis.FALLS]
    assert not lamb.settled
    assert analysis.compare_holding(lamb, sgd) == analysis.CANNOT_TELL  # [32, 128] against [64, 64]
    assert lars.holds_to == lars.could_hold_to == 256 and lars.falls_at is None
    assert adamw.holds_to == adamw.peak_batch and adamw.could_hold_to == 256 and adamw.falls_at is None
    assert {v.verdict for v in adamw.verdicts} == {analysis.UNCLEAR}
    assert analysis.compare_holding(lars, sgd) == analysis.YES
    assert analysis.compare_holding(sgd, lars) == analysis.NO
    assert analysis.compare_holding(adamw, sgd) == analysis.CANNOT_TELL


def test_holding_difference_is_welch_against_the_peak() -> None:
    hold = analysis.holding(cells_of(TABLE), tolerance=0.02)
    v = hold["sgd"].verdicts[1]
    theirs = scipy_stats.ttest_ind(TABLE["sgd"][128], TABLE["sgd"][32], equal_var=False).confidence_interval()
    assert v.batch == 128 and (v.difference.low, v.difference.high) == pytest.approx((theirs.low, theirs.high))
    assert hold["sgd"].drop.estimate == pytest.approx(0.96 - 0.60)


def test_findings_say_cannot_tell_where_the_seeds_cannot_separate() -> None:
    table = {opt: TABLE[opt] for opt in ("sgd", "lamb", "adamw")}
    found = {f.name: f for f in summary.findings([], cells_of(table), 0.02, "sgd", adaptive=("lamb", "adamw"))}
    assert found["every_optimizer_falls"].holds is None  # adamw: no batch surely falls, none surely holds
    assert found["every_optimizer_falls"].sentence.startswith("Cannot tell")
    assert found["adamw_beyond_sgd"].holds is None and "cannot be told apart from" in found["adamw_beyond_sgd"].sentence
    text = summary.summary_markdown(list(found.values()), adaptive=("lamb", "adamw"))
    assert text.startswith("**The run does not show") or text.startswith("**Cannot tell")
    only_unknown = [f for f in found.values() if f.name in ("every_optimizer_falls", "adamw_beyond_sgd")]
    assert summary.summary_markdown(only_unknown, adaptive=("adamw",)).startswith("**Cannot tell whether")


def test_findings_with_every_claim_true_show_the_shape() -> None:
    table = {"sgd": TABLE["sgd"],
             "lars": {**TABLE["lars"], 256: [0.80, 0.81, 0.79]},
             "lamb": {32: [0.95, 0.951, 0.949], 64: [0.95, 0.952, 0.951], 128: [0.949, 0.95, 0.951],
                      256: [0.85, 0.86, 0.84]}}
    found = {f.name: f for f in summary.findings([], cells_of(table), 0.02, "sgd")}
    assert found["every_optimizer_falls"].holds is True
    assert found["lars_beyond_sgd"].holds is True and found["lamb_beyond_sgd"].holds is True
    assert "B=128 vs B=64" in found["lars_beyond_sgd"].sentence
    assert summary.summary_markdown(list(found.values())).startswith("**The run shows the paper's shape**")
    winner = found["largest_batch_winner"]
    assert winner.holds is True and "lamb's 85.0% ± " in winner.sentence and "a clear lead" in winner.sentence


def test_comparison_of_two_contestants_batch_by_batch() -> None:
    table = {"a": {64: [0.95, 0.951, 0.949], 256: [0.90, 0.91, 0.89], 1024: [0.50, 0.52, 0.48]},
             "b": {64: [0.95, 0.952, 0.948], 256: [0.93, 0.931, 0.929], 1024: [0.20, 0.21, 0.19]}}
    found = summary.comparison(cells_of(table), "a", "b")
    assert found.holds is None  # better at one batch, worse at another
    assert "better at B=1024 (30.0 [" in found.sentence and "worse at B=256 (-3.0 [" in found.sentence
    assert "not separable at B=64" in found.sentence
    only_better = summary.comparison(cells_of({"a": table["a"], "b": {**table["b"], 256: table["a"][256]}}), "a", "b")
    assert only_better.holds is True
    assert summary.comparison(cells_of({"a": table["b"], "b": table["b"]}), "a", "b").holds is None


def fits_of(budget: str, batch: int, steps: int, finals: list[float], top1: list[float]) -> list[analysis.DiffusionFit]:
    return [analysis.DiffusionFit(batch, budget, seed, steps, t, d, 1.0, 0.9, 0.2)
            for seed, (d, t) in enumerate(zip(finals, top1))]


def test_diffusion_and_regime_adaptation_findings_with_seeds() -> None:
    fits = (fits_of("epochs", 64, 460, [24.0, 25.0, 24.5], [0.95, 0.96, 0.955])
            + fits_of("epochs", 512, 60, [50.0, 52.0, 51.0], [0.50, 0.55, 0.45])
            + fits_of("steps", 64, 300, [20.0, 21.0, 20.5], [0.94, 0.95, 0.945])
            + fits_of("steps", 512, 300, [20.0, 60.0, 140.0], [0.90, 0.91, 0.89]))
    rows = analysis.diffusion_by_batch(fits)
    assert [(r.budget, r.batch, len(r.fits)) for r in rows] == [("epochs", 64, 3), ("epochs", 512, 3),
                                                                 ("steps", 64, 3), ("steps", 512, 3)]
    found = {f.name: f for f in summary._diffusion_findings(rows, "sgd", 0.95)}
    assert found["diffusion_epochs"].holds is False
    assert "ends farther from w_0 than" in found["diffusion_epochs"].sentence
    assert found["diffusion_steps"].holds is None  # 20, 60, 140: the seeds cannot place it
    assert "the seeds cannot separate" in found["diffusion_steps"].sentence
    regime = found["regime_adaptation"]  # gap 45.5 points at fixed epochs, 4.5 at fixed steps
    assert regime.holds is True and "closes part of the gap" in regime.sentence
    assert "45.5 [" in regime.sentence and "4.5 [" in regime.sentence


# ---------------------------------------------------------------- the sweep runs the search to its end


class FakeConfig(dict):
    def __init__(self, **kw: Any) -> None:
        super().__init__(kw)


# Where each (optimizer, batch) peaks, as a factor of its scaled LR: inside the grid, two steps below it,
# and far above it (the search must stop at its limit there).
PEAKS = {("sgd", 32): 1.0, ("sgd", 512): 1 / 9, ("lamb", 32): 1000.0, ("lamb", 512): 3.0}


def fake_train(cfg: FakeConfig) -> dict[str, Any]:
    base = {"sgd": 0.8, "lamb": 0.05}[cfg["optimizer"]]
    factor = cfg["base_lr"] / base
    distance = math.log(factor / PEAKS[(cfg["optimizer"], cfg["global_batch"])], 3)
    top1 = 0.9 - 0.05 * distance**2 + 0.002 * cfg["seed"]
    steps = math.ceil(cfg["epochs"] * math.ceil(1437 / cfg["global_batch"]))
    return {"top1": top1, "top5": min(1.0, top1 + 0.05), "steps": steps, "epochs": cfg["epochs"], "wall_time_s": 1.0,
            "images_per_s": 100.0, "optimizer_share": 0.1, "data_time_share": 0.2, "steps_to_target": None,
            "history": []}


def tiny_preset() -> Preset:
    quick = PRESETS["quick"]
    return dataclasses.replace(quick, optimizers=tuple(o for o in quick.optimizers if o.label in ("sgd", "lamb")),
                               lr_factors=(1 / 3, 1.0, 3.0), max_lr_extensions=3, seeds=(0, 1, 2),
                               batches=(32, 512), diffusion_batches=(32,), heldout=())


def test_sweep_extends_each_cell_until_its_best_lr_is_inside(tmp_path: Path) -> None:
    preset = tiny_preset()
    engine = Engine("fake", FakeConfig, fake_train, lambda _data: 1437)
    runs = plan_runs(preset, 1437, engine="fake")
    follow = lr_search(preset, 1437, engine="fake")
    cache = ResultCache(tmp_path / "cache")
    outcome = execute(runs, cache, tmp_path / "runs", engine, follow_up=follow)
    cells = {(c.optimizer, c.batch): c for c in analysis.best_cells(outcome.records, preset.lr_factors, 3)}
    assert cells[("sgd", 32)].factors == pytest.approx((1 / 3, 1.0, 3.0)) and cells[("sgd", 32)].extensions == 0
    assert cells[("sgd", 512)].factors == pytest.approx((1 / 27, 1 / 9, 1 / 3, 1.0, 3.0))
    assert cells[("sgd", 512)].lr_factor == pytest.approx(1 / 9) and not cells[("sgd", 512)].lr_at_edge
    assert cells[("lamb", 32)].factors == pytest.approx((1 / 3, 1.0, 3.0, 9.0, 27.0, 81.0))
    assert cells[("lamb", 32)].edge_unresolved and cells[("lamb", 32)].lr_edge == search.HIGH
    assert cells[("lamb", 512)].factors == pytest.approx((1 / 3, 1.0, 3.0, 9.0))
    assert all(c.seeds == 3 for c in cells.values())
    extra = 2 + 3 + 1  # extensions of sgd@512, lamb@32, lamb@512, each for 3 seeds
    assert outcome.executed == len(runs) + 3 * extra and outcome.cached == 0
    finding = summary._lr_search_finding(list(cells.values()))
    assert finding.holds is False and "lamb B=32 (highest LR" in finding.sentence
    assert "after 3 extensions" in finding.sentence

    again = execute(plan_runs(preset, 1437, engine="fake"), cache, tmp_path / "runs", engine, follow_up=follow)
    assert again.executed == 0 and again.cached == outcome.executed
    assert [r["key"] for r in again.records] == [r["key"] for r in outcome.records]

    # a preset that names the same configs differently reads them from the cache under its own labels
    renamed = dataclasses.replace(preset, optimizers=tuple(
        dataclasses.replace(o, label="lamb_b") if o.label == "lamb" else o for o in preset.optimizers))
    relabelled = execute(plan_runs(renamed, 1437, engine="fake"), cache, tmp_path / "runs", engine,
                         follow_up=lr_search(renamed, 1437, engine="fake"))
    assert relabelled.executed == 0
    assert sorted({r["optimizer"] for r in relabelled.records}) == ["lamb_b", "sgd"]
