"""The state-formats preset and its analysis: the plan (the default's held-out seeds and chosen LRs, fp32
runs identical to the default's), the paired intervals and verdicts on synthetic records, the report
from a fake trainer's sweep, and the real trainer on a one-step grid."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats

from train.study import formats, formats_report, stats
from train.study.__main__ import main
from train.study.cache import ResultCache
from train.study.presets import DEFAULT, PRESETS, STATE_FORMATS, OptimizerSpec
from train.study.sweep import Engine, execute, lr_search, plan_runs, planned_run

REPO = Path(__file__).resolve().parents[1]
PRESET = PRESETS["state-formats"]


def test_default_preset_is_untouched() -> None:
    """The default keeps its search and fp32 state: no run config of its plan names a state format."""
    assert PRESETS["default"] is DEFAULT and not DEFAULT.fixed_lr_factors and not DEFAULT.compares_states
    assert DEFAULT.optim_state_min_size is None
    assert all("optim_state" not in r.config and "optim_state_min_size" not in r.config
               for r in plan_runs(DEFAULT, 1437))


def test_plan_is_the_defaults_heldout_runs_in_every_state_format() -> None:
    runs = plan_runs(PRESET, 1437)
    assert {o.label for o in PRESET.optimizers} == {f"{opt}{'' if f == 'fp32' else '-' + f}"
                                                     for opt in ("lars", "lamb") for f in STATE_FORMATS}
    assert all(r.phase == "heldout" and r.budget == "epochs" for r in runs)
    per_batch = sum(len(DEFAULT.heldout_seeds(b)) for b in DEFAULT.batches)
    assert len(runs) == 6 * per_batch == 342
    assert lr_search(PRESET, 1437)(runs, {}) == []  # nothing to search
    for r in runs:
        spec = PRESET.optimizer(r.optimizer)
        assert r.seed in DEFAULT.heldout_seeds(r.batch)
        # the fp32 twin of every run is the default preset's held-out run, config and cache key alike
        twin = planned_run(DEFAULT, spec.optimizer, r.batch, r.lr_factor, "epochs", r.seed, 1437, {}, "train.engine",
                           "heldout")
        extra = {k: v for k, v in r.config.items() if k not in twin.config}
        assert {k: v for k, v in r.config.items() if k in twin.config} == twin.config
        if spec.optim_state == "fp32":
            assert extra == {} and r.key == twin.key
        else:
            assert extra == {"optim_state": spec.optim_state, "optim_state_min_size": 0} and r.key != twin.key


def test_fixed_lrs_are_the_defaults_committed_choices() -> None:
    """The fixed factors equal the lr_factor column of the default's committed results.csv."""
    with (REPO / "train/study/results/default/results.csv").open() as f:
        chosen = {(row["optimizer"], int(row["batch"])): float(row["lr_factor"]) for row in csv.DictReader(f)}
    for optimizer, batch, factor in PRESET.fixed_lr_factors:
        assert factor == pytest.approx(chosen[(optimizer, batch)], rel=1e-5)
    fixed = {(o, b) for o, b, _ in PRESET.fixed_lr_factors}
    assert fixed == {(o, b) for o in ("lars", "lamb") for b in DEFAULT.batches}
    with pytest.raises(KeyError, match="no LR factor for lamb at batch 32"):
        PRESET.fixed_lr_factor("lamb-int8", 32)


def test_preset_and_spec_reject_bad_state_settings() -> None:
    with pytest.raises(ValueError, match="optim_state must be one of"):
        OptimizerSpec("x", "lamb", 0.1, "sqrt", 0.0, optim_state="fp8")
    with pytest.raises(ValueError, match="applies to lars and lamb, not sgd"):
        OptimizerSpec("x", "sgd", 0.1, "linear", 0.0, optim_state="int8")
    with pytest.raises(ValueError, match="heldout must not be empty"):
        dataclasses.replace(PRESET, heldout=())
    with pytest.raises(ValueError, match="optim_state_min_size must be ≥ 0"):
        dataclasses.replace(PRESET, optim_state_min_size=-1)


def test_verdict_against_the_margin() -> None:
    iv = stats.Interval
    assert formats.verdict_of(iv(0.002, -0.004, 0.008, 5)) == formats.WITHIN
    assert formats.verdict_of(iv(0.03, 0.012, 0.05, 5)) == formats.DIFFERS
    assert formats.verdict_of(iv(-0.03, -0.05, -0.011, 5)) == formats.DIFFERS
    assert formats.verdict_of(iv(0.01, 0.002, 0.02, 5)) == formats.CANNOT_TELL  # excludes 0, reaches +1
    assert formats.verdict_of(iv(0.0, -0.012, 0.005, 5)) == formats.CANNOT_TELL
    assert formats.verdict_of(iv(0.0, -math.inf, math.inf, 1)) == formats.CANNOT_TELL
    assert formats.verdict_of(iv(0.0, -0.01, 0.0, 5)) == formats.CANNOT_TELL  # touching the margin is not inside
    assert formats.verdict_sentence("int8", formats.WITHIN) == "int8 within 1 point of fp32"
    assert formats.verdict_sentence("bf16", formats.DIFFERS) == "bf16 differs from fp32 by more than 1 point"


def _record(optimizer: str, batch: int, state: str, seed: int, top1: float, share: float = 0.1) -> dict[str, Any]:
    config: dict[str, Any] = {"optimizer": optimizer}
    if state != "fp32":
        config["optim_state"] = state
    return {"budget": "epochs", "phase": "heldout", "optimizer": optimizer, "batch": batch, "seed": seed,
            "lr": 0.1, "lr_factor": 1.0, "config": config,
            "result": {"top1": top1, "top5": 1.0, "steps": 10, "wall_time_s": 1.0, "optimizer_share": share}}


def test_differences_are_paired_by_seed() -> None:
    """Seed effects far larger than the format's shift: the paired interval is that of the per-seed
    differences (scipy's one-sample t), narrow, though Welch's over the two groups cannot place it;
    seeds trained in only one format are left out."""
    rng = random.Random(0)
    seed_effect = {s: rng.gauss(0.0, 0.05) for s in range(2, 12)}
    shift = {s: 0.003 + rng.gauss(0.0, 0.002) for s in seed_effect}
    records = [_record("lamb", 512, "fp32", s, 0.8 + e) for s, e in seed_effect.items()]
    records += [_record("lamb", 512, "int8", s, 0.8 + e + shift[s], share=0.4) for s, e in seed_effect.items()
                if s != 11]
    records.append(_record("lamb", 512, "int8", 40, 0.9))  # no fp32 twin
    (c,) = formats.compare(records)
    seeds = list(range(2, 11))
    d = [shift[s] for s in seeds]
    assert (c.optimizer, c.batch, c.state, c.seeds) == ("lamb", 512, "int8", 9)
    assert [s for s, _, _ in c.per_seed] == seeds
    assert c.difference.estimate == pytest.approx(statistics.fmean(d), abs=1e-12)
    low, high = scipy_stats.t.interval(0.95, len(d) - 1, loc=statistics.fmean(d), scale=scipy_stats.sem(d))
    assert (c.difference.low, c.difference.high) == pytest.approx((low, high), abs=1e-12)
    assert c.verdict == formats.WITHIN and c.excludes_zero
    welch = stats.difference_interval([0.8 + seed_effect[s] + shift[s] for s in seeds],
                                      [0.8 + seed_effect[s] for s in seeds])
    assert welch.half_width > 5 * c.difference.half_width and formats.verdict_of(welch) == formats.CANNOT_TELL
    assert (c.optimizer_share, c.fp32_optimizer_share) == pytest.approx((0.4, 0.1))
    assert json.loads(json.dumps(c.as_dict()))["excludes_zero"] is True


def test_batch_verdict_over_optimizers() -> None:
    def comparisons(verdicts: dict[tuple[str, int], float]) -> list[formats.Comparison]:
        records = []
        for (optimizer, batch), shift in verdicts.items():
            for s, noise in enumerate((0.0, 0.001, -0.001, 0.002)):
                records += [_record(optimizer, batch, "fp32", s, 0.5 + 0.01 * s),
                            _record(optimizer, batch, "int8", s, 0.5 + 0.01 * s + shift + noise)]
        return formats.compare(records)

    cs = comparisons({("lamb", 64): 0.0, ("lars", 64): 0.0, ("lamb", 512): 0.0, ("lars", 512): -0.05,
                      ("lamb", 1024): 0.0, ("lars", 1024): 0.01})
    assert {(c.optimizer, c.batch): c.verdict for c in cs}[("lars", 1024)] == formats.CANNOT_TELL
    assert formats.batch_verdicts(cs, "int8") == {64: formats.WITHIN, 512: formats.DIFFERS, 1024: formats.CANNOT_TELL}
    assert formats.batch_verdicts(cs, "bf16") == {}


def _fake_train(cfg: dict[str, Any]) -> dict[str, Any]:
    """int8 costs LARS 3 points at batch 1024 and nothing elsewhere; bf16 nothing; seeds move everything."""
    top1 = 0.9 - 0.1 * math.log2(cfg["global_batch"] / 64) / 4 + 0.02 * math.sin(cfg["seed"])
    if cfg.get("optim_state") == "int8" and cfg["optimizer"] == "lars" and cfg["global_batch"] == 1024:
        top1 -= 0.03 + 0.002 * math.cos(cfg["seed"])
    return {"top1": top1, "top5": 1.0, "steps": cfg["max_steps"], "epochs": cfg["epochs"], "wall_time_s": 1.0,
            "images_per_s": 100.0, "optimizer_share": 0.3 if cfg.get("optim_state") else 0.05,
            "data_time_share": 0.2, "steps_to_target": None, "history": []}


class _FakeConfig(dict):
    def __init__(self, **kw: Any) -> None:
        super().__init__(kw)


def test_report_from_a_fake_sweep(tmp_path: Path) -> None:
    engine = Engine("fake", _FakeConfig, _fake_train, lambda _data: 1437)
    preset = dataclasses.replace(PRESET, heldout=((64, 3), (1024, 4)))
    outcome = execute(plan_runs(preset, 1437, batches=[64, 1024], engine="fake"), ResultCache(tmp_path / "cache"),
                      tmp_path / "runs", engine)
    assert outcome.executed == 6 * (3 + 4)
    meta = {"runs": len(outcome.records), "executed": outcome.executed, "cached": 0, "jobs": 1, "wall_time_s": 1.0,
            "machine": "test machine", "engine": "fake"}
    report = formats_report.write_report(outcome.records, preset, tmp_path / "report", meta)
    written = json.loads((tmp_path / "report" / "formats.json").read_text())
    assert written["batch_verdicts"] == {"bf16": {"64": "within", "1024": "within"},
                                         "int8": {"64": "within", "1024": "differs"}}
    rows = list(csv.DictReader((tmp_path / "report" / "results.csv").open()))
    assert len(rows) == 2 * 2 * 2
    lars = next(r for r in rows if (r["optimizer"], r["batch"], r["state"]) == ("lars", "1024", "int8"))
    expected = -0.03 - 0.002 * statistics.fmean(math.cos(s) for s in range(2, 6))
    assert float(lars["difference"]) == pytest.approx(expected, abs=1e-4)
    assert lars["verdict"] == "differs" and lars["seeds"] == "4"
    assert len(list(csv.DictReader((tmp_path / "report" / "runs.csv").open()))) == 42
    text = report.read_text()
    assert "| int8 | int8 within 1 point of fp32 | int8 differs from fp32 by more than 1 point |" in text
    assert "432, 4,608 and 320 elements" in text
    for name in formats_report.PLOT_FILES:
        assert (tmp_path / "report" / name).read_bytes().startswith(b"\x89PNG")


def test_state_formats_study_on_the_real_trainer(tmp_path: Path, monkeypatch, capsys) -> None:
    """`python -m train.study --preset state-formats` on one batch, LAMB fp32 and int8, one update per run:
    the int8 runs' configs carry the format, the report pairs the five held-out seeds, a rerun trains nothing."""
    monkeypatch.setenv("FASTLARS_DATA_CACHE", str(tmp_path / "data"))
    args = ["--preset", "state-formats", "--optimizers", "lamb,lamb-int8", "--batches", "64", "--epochs", "0.05",
            "--out", str(tmp_path / "study"), "--no-progress", "--no-tensorboard", "--jobs", "1"]
    assert main(args) == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "study" / "cache").glob("*.json")]
    assert len(records) == 10
    assert sorted(formats.state_of(r) for r in records) == ["fp32"] * 5 + ["int8"] * 5
    assert all(r["config"]["optim_state_min_size"] == 0 for r in records if formats.state_of(r) == "int8")
    written = json.loads((tmp_path / "study" / "formats.json").read_text())
    (c,) = written["comparisons"]
    assert (c["optimizer"], c["batch"], c["state"], c["seeds"]) == ("lamb", 64, "int8", 5)
    assert "Verdict per batch" in capsys.readouterr().out
    assert main(args) == 0
    assert json.loads((tmp_path / "study" / "study.json").read_text())["executed"] == 0
