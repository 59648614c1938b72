"""The pre-registered verdict on made-up results with known answers: difference-in-drops intervals and
p-values (checked against SciPy), Holm's correction, the seeds a half-width needs, the decisions and the
shape; held-out selection through the sweep with a stand-in trainer; the digits' cross-validation folds."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats as scipy_stats
from test_study_stats import FakeConfig, cell, fake_train, tiny_preset

from train.study import analysis, stats, verdict
from train.study.cache import ResultCache
from train.study.presets import PRESETS
from train.study.sweep import Engine, execute, lr_search, plan_runs

# ---------------------------------------------------------------- intervals and tests of contrasts


def test_two_group_p_value_is_welchs() -> None:
    a, b = [0.91, 0.93, 0.96, 0.92], [0.88, 0.95, 0.90]
    assert stats.contrast_p_value([a, b], [1.0, -1.0]) == pytest.approx(
        scipy_stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)
    # against a non-zero null: shift one group by it
    assert stats.contrast_p_value([a, b], [1.0, -1.0], null=0.02) == pytest.approx(
        scipy_stats.ttest_ind(a, [v + 0.02 for v in b], equal_var=False).pvalue, rel=1e-10)
    assert stats.contrast_p_value([a, [0.9]], [1.0, -1.0]) == 1.0  # one value: no variance, no test


def test_difference_in_drops_interval_and_p_value_by_hand_with_scipy() -> None:
    x0, xb, s0, sb = [0.95, 0.96, 0.94, 0.955], [0.80, 0.85, 0.83], [0.96, 0.95, 0.97], [0.70, 0.60, 0.65, 0.72]
    got = stats.contrast_interval([x0, xb, s0, sb], [1.0, -1.0, -1.0, 1.0], 0.95)
    means = [statistics.fmean(g) for g in (x0, xb, s0, sb)]
    estimate = (means[0] - means[1]) - (means[2] - means[3])
    terms = [statistics.variance(g) / len(g) for g in (x0, xb, s0, sb)]
    se = math.sqrt(sum(terms))
    dof = sum(terms) ** 2 / sum(t * t / (len(g) - 1) for t, g in zip(terms, (x0, xb, s0, sb)))
    half = scipy_stats.t.ppf(0.975, dof) * se
    assert (got.estimate, got.low, got.high) == pytest.approx((estimate, estimate - half, estimate + half), rel=1e-12)
    p = stats.contrast_p_value([x0, xb, s0, sb], [1.0, -1.0, -1.0, 1.0])
    assert p == pytest.approx(2 * scipy_stats.t.sf(abs(estimate) / se, dof), rel=1e-10)
    assert estimate < 0 and p < 0.05  # x drops 12.5 points, sgd 29: x drops less


def test_holm_known_answers() -> None:
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # step-down monotonicity: a larger raw p never gets a smaller adjusted one
    assert stats.holm([0.001, 0.02, 0.019, 0.5]) == pytest.approx([0.004, 0.057, 0.057, 0.5])
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0] and stats.holm([]) == []


def test_holm_controls_the_family_wise_error_under_the_global_null() -> None:
    """Under the global null the p-values are uniform: Holm at α rejects something in about α of families or
    fewer (Bonferroni bound); uncorrected tests reject far more often."""
    rng = scipy_stats.uniform.rvs(size=(4000, 8), random_state=0)
    holm_any = sum(any(q < 0.05 for q in stats.holm(list(row))) for row in rng) / len(rng)
    raw_any = sum(any(p < 0.05 for p in row) for row in rng) / len(rng)
    assert holm_any <= 0.06 and raw_any > 0.3


def test_holm_matches_the_definition_by_brute_force() -> None:
    p = [0.012, 0.3, 0.0004, 0.049, 0.02]
    m = len(p)
    ranked = sorted(p)
    for i, value in enumerate(p):
        k = ranked.index(value)
        expected = max(min(1.0, (m - j) * ranked[j]) for j in range(k + 1))
        assert stats.holm(p)[i] == pytest.approx(expected)


def test_seeds_needed_is_the_smallest_n_reaching_the_half_width() -> None:
    groups = [[0.95, 0.96, 0.94], [0.70, 0.78, 0.66, 0.74], [0.96, 0.955, 0.965], [0.60, 0.72, 0.65]]
    weights = [1.0, -1.0, -1.0, 1.0]
    n = stats.seeds_needed(groups, weights, 0.02)
    parts = [statistics.variance(g) for g in groups]
    ratio = sum(parts) ** 2 / sum(v * v for v in parts)

    def half(k: int) -> float:
        return scipy_stats.t.ppf(0.975, (k - 1) * ratio) * math.sqrt(sum(parts) / k)

    assert n is not None and half(n) <= 0.02 < half(n - 1)
    # with n seeds in every group of the observed spread, the interval is that wide
    assert stats.seeds_needed(groups, weights, 10.0) == 2
    assert stats.seeds_needed([[0.5], [0.4, 0.6]], [1.0, -1.0], 0.02) is None


# ---------------------------------------------------------------- decisions and the shape

def _table(sgd_big: list[float], lars_big: list[float], lamb_big: list[float]) -> list[analysis.Cell]:
    small = {"sgd": [0.95, 0.96, 0.955, 0.958, 0.952], "lars": [0.94, 0.945, 0.95, 0.948, 0.942],
             "lamb": [0.955, 0.96, 0.958, 0.95, 0.962]}
    big = {"sgd": sgd_big, "lars": lars_big, "lamb": lamb_big}
    return [cell(o, b, runs) for o in small for b, runs in ((64, small[o]), (1024, big[o]))]


def test_shape_shows_when_all_fall_and_both_adaptive_drop_less() -> None:
    cells = _table([0.60, 0.62, 0.58, 0.61, 0.59], [0.85, 0.86, 0.84, 0.855, 0.845], [0.88, 0.87, 0.89, 0.875, 0.885])
    v = verdict.decide(cells, (1024,), 0.02)
    assert v.shape == verdict.SHOWS
    assert all(v.get(f"drop_{o}").decision == verdict.FALLS for o in ("sgd", "lars", "lamb"))
    assert v.get("did_lars_1024").decision == v.get("did_lamb_1024").decision == verdict.LESS
    did = v.get("did_lars_1024")
    assert did.seeds == (5, 5, 5, 5) and did.interval.estimate < 0
    # the family: 3 drops + 2 DiD, Holm over all five
    assert len(v.contrasts) == 5
    assert [c.p_holm for c in v.contrasts] == pytest.approx(stats.holm([c.p for c in v.contrasts]))
    assert "shows the paper's shape" in verdict.headline(v)


def test_shape_contradicted_when_lamb_drops_more_and_open_when_noisy() -> None:
    cells = _table([0.80, 0.81, 0.79, 0.805, 0.795], [0.85, 0.86, 0.84, 0.855, 0.845], [0.60, 0.62, 0.58, 0.61, 0.59])
    v = verdict.decide(cells, (1024,), 0.02)
    assert v.get("did_lamb_1024").decision == verdict.MORE and v.shape == verdict.CONTRADICTED
    noisy = _table([0.60, 0.90, 0.40, 0.80, 0.55], [0.85, 0.50, 0.95, 0.60, 0.75], [0.88, 0.5, 0.95, 0.7, 0.6])
    v = verdict.decide(noisy, (1024,), 0.02)
    assert v.get("did_lars_1024").decision == verdict.CANNOT_TELL and v.shape == verdict.OPEN
    within = _table([0.60, 0.62, 0.58, 0.61, 0.59], [0.94, 0.945, 0.95, 0.948, 0.942], [0.88, 0.87, 0.89, 0.875, 0.9])
    v = verdict.decide(within, (1024,), 0.02)
    assert v.get("drop_lars").decision == verdict.WITHIN and v.shape == verdict.CONTRADICTED


def test_every_decision_is_its_holm_p_value_against_alpha() -> None:
    """Undecided exactly where the Holm-adjusted p is ≥ 5%; Holm p ≥ raw p; the direction is the estimate's."""
    tables = [([0.60, 0.62, 0.58, 0.61, 0.59], [0.85, 0.86, 0.84, 0.855, 0.845], [0.88, 0.87, 0.89, 0.875, 0.885]),
              ([0.60, 0.90, 0.40, 0.80, 0.55], [0.85, 0.50, 0.95, 0.60, 0.75], [0.88, 0.5, 0.95, 0.7, 0.6]),
              ([0.90, 0.93, 0.91, 0.92, 0.94], [0.91, 0.90, 0.93, 0.94, 0.90], [0.80, 0.95, 0.85, 0.9, 0.92])]
    seen = set()
    for sgd_big, lars_big, lamb_big in tables:
        for c in verdict.decide(_table(sgd_big, lars_big, lamb_big), (1024,), 0.02).contrasts:
            assert c.p_holm >= c.p
            undecided = c.decision in (verdict.UNCLEAR, verdict.CANNOT_TELL)
            assert undecided == (c.p_holm >= 0.05)
            if not undecided:
                assert (c.interval.estimate > c.null) == (c.decision in (verdict.FALLS, verdict.MORE))
            seen.add(c.decision)
    assert {verdict.FALLS, verdict.LESS, verdict.CANNOT_TELL, verdict.UNCLEAR} <= seen


def test_missing_cells_are_an_error() -> None:
    cells = [c for c in _table([0.6] * 5, [0.8] * 5, [0.8] * 5) if not (c.optimizer == "lamb" and c.batch == 1024)]
    with pytest.raises(ValueError, match="missing"):
        verdict.decide(cells, (1024,), 0.02)


# ---------------------------------------------------------------- held-out seeds through the sweep


def test_sweep_reports_held_out_seeds_at_the_chosen_lr(tmp_path: Path) -> None:
    preset = dataclasses.replace(tiny_preset(), heldout=((32, 2), (512, 4)))
    engine = Engine("fake", FakeConfig, fake_train, lambda _data: 1437)
    outcome = execute(plan_runs(preset, 1437, engine="fake"), ResultCache(tmp_path / "cache"), tmp_path / "runs",
                      engine, follow_up=lr_search(preset, 1437, engine="fake"))
    cells = {(c.optimizer, c.batch): c for c in analysis.best_cells(outcome.records, preset.lr_factors, 3)}
    fresh = [r for r in outcome.records if analysis.phase_of(r) == "heldout"]
    assert len(fresh) == 2 * 2 + 2 * 4  # two optimizers: 2 seeds at 32, 4 at 512
    for (opt, batch), c in cells.items():
        mine = [r for r in fresh if r["optimizer"] == opt and r["batch"] == batch]
        assert sorted(analysis.seed_of(r) for r in mine) == list(preset.heldout_seeds(batch))
        assert not set(preset.heldout_seeds(batch)) & set(preset.seeds)
        assert {r["lr_factor"] for r in mine} == {c.lr_factor}  # only the LR the search chose
        assert c.heldout and c.seeds == len(mine)
        # fake_train: top1 = f(LR) + 0.002·seed, so the held-out mean is the search mean + 0.002·(Δ mean seed)
        shift = 0.002 * (statistics.fmean(preset.heldout_seeds(batch)) - statistics.fmean(preset.seeds))
        assert c.top1.estimate == pytest.approx(c.search_top1 + shift)
    assert preset.heldout_seeds(16) == ()


# ---------------------------------------------------------------- cross-validation folds of the digits


def test_digits_folds_are_stratified_disjoint_and_cover_every_image() -> None:
    from sklearn.datasets import load_digits

    from train.data.folders import digits_fold_split

    target = load_digits().target
    vals = []
    for fold in range(5):
        train, val = digits_fold_split(fold)
        assert not set(train) & set(val) and len(train) + len(val) == len(target)
        vals.append(set(val))
        counts = [int((target[val] == k).sum()) for k in range(10)]
        totals = [int((target == k).sum()) for k in range(10)]
        assert all(abs(c - t / 5) < 1 for c, t in zip(counts, totals))  # each class in proportion
    assert all(not a & b for a, b in itertools.combinations(vals, 2))
    assert set().union(*vals) == set(range(len(target)))
    with pytest.raises(ValueError, match="fold"):
        digits_fold_split(5)


def test_runs_take_their_fold_from_the_seed() -> None:
    from train.data.folders import digits_fold_of, is_default_data

    preset = PRESETS["default"]
    assert preset.data_for_seed("default", 7) == "default:fold=2"
    assert preset.data_for_seed("/data/x", 7) == "/data/x"
    assert digits_fold_of("default:fold=3") == 3 and digits_fold_of("default") is None
    assert is_default_data("default:fold=0") and not is_default_data("/data/default")
    with pytest.raises(ValueError, match="fold"):
        digits_fold_of("default:fold=9")
    seeds = {r.config["data"] for r in plan_runs(preset, 1437) if r.budget == "epochs"}
    assert seeds == {f"default:fold={s % 5}" for s in preset.seeds}
    folds = {s % 5 for b, _ in preset.heldout for s in preset.heldout_seeds(b)}
    assert folds == set(range(5))  # the held-out seeds between them validate on every fold
