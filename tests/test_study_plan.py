"""Study planning and cache: LR scaling, batch grids, config hashing, atomic records, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from train.study.cache import NON_RESULT_FIELDS, ResultCache, config_hash, write_json_atomic
from train.study.presets import (
    PRESETS,
    OptimizerSpec,
    power_of_two_batches,
    scaled_lr,
    warmup_epochs,
    with_lars_recipe,
)
from train.study.sweep import plan_runs


def test_scaled_lr_rules() -> None:
    assert scaled_lr(0.1, 1024, 256, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.004, 1024, 256, "sqrt") == pytest.approx(0.008)
    assert scaled_lr(0.3, 1024, 256, "none") == 0.3
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(0.1, 64, 256, "cubic")
    with pytest.raises(ValueError, match="batch"):
        scaled_lr(0.1, 0, 256, "linear")


def test_power_of_two_batches_end_at_the_whole_training_set() -> None:
    assert power_of_two_batches(16, 1437) == (16, 32, 64, 128, 256, 512, 1024, 1437)
    assert power_of_two_batches(16, 256) == (16, 32, 64, 128, 256)
    imagenet = power_of_two_batches(1024, 1_281_167)
    assert imagenet[0] == 1024 and imagenet[-2] == 2**20 and imagenet[-1] == 1_281_167
    with pytest.raises(ValueError, match="power of two"):
        power_of_two_batches(24, 1000)
    with pytest.raises(ValueError, match="train_size"):
        power_of_two_batches(16, 8)


def test_optimizer_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="lr_scaling"):
        OptimizerSpec("x", "sgd", 0.1, "log", 0.0)
    with pytest.raises(ValueError, match="base_lr"):
        OptimizerSpec("x", "sgd", -0.1, "linear", 0.0)
    with pytest.raises(ValueError, match="warmup"):
        OptimizerSpec("x", "lars", 0.1, "linear", 0.0, warmup="step")


def test_plan_covers_the_grid_and_the_fixed_step_runs() -> None:
    preset = PRESETS["default"]
    runs = plan_runs(preset, 1437)
    batches = preset.resolve_batches(1437)
    epoch_runs = [r for r in runs if r.budget == "epochs"]
    step_runs = [r for r in runs if r.budget == "steps"]
    seeds = len(preset.seeds)
    assert seeds >= 2
    assert len(epoch_runs) == len(batches) * len(preset.optimizers) * len(preset.lr_factors) * seeds
    assert sorted((r.batch, r.seed) for r in step_runs) == sorted(
        (b, s) for b in preset.diffusion_batches for s in preset.seeds)
    assert len({r.key for r in runs}) == len(runs)
    for r in step_runs:
        assert r.config["max_steps"] == preset.fixed_steps == r.steps
        assert r.config["epochs"] * math.ceil(1437 / r.batch) >= preset.fixed_steps
    for r in epoch_runs:
        spec = preset.optimizer(r.optimizer)
        assert r.lr == pytest.approx(r.lr_factor * scaled_lr(spec.base_lr, r.batch, preset.base_batch,
                                                             spec.lr_scaling))
        assert r.config["lr"] == r.lr and r.config["global_batch"] == r.batch and r.config["seed"] == r.seed
        assert r.config["data"] == f"default:fold={r.seed % 5}" and r.phase == "search"
        assert r.config["nesterov"] == (r.optimizer == "nesterov")
        assert r.config["noise_scale"] == (r.lr_factor == 1.0 and r.optimizer == preset.diffusion_optimizer)
        # equal samples per epoch at every batch: T·B within B/2 of epochs·N, no wrap-around bonus
        assert r.steps == r.config["max_steps"] and abs(r.steps * r.batch - preset.epochs * 1437) <= r.batch / 2
        assert r.config["epochs"] * math.ceil(1437 / r.batch) >= r.steps
    subset = plan_runs(preset, 1437, optimizers=["lars"], batches=[64])
    assert {(r.optimizer, r.batch) for r in subset} == {("lars", 64)}
    assert {r.key for r in subset} <= {r.key for r in runs}  # a subset shares the full sweep's cache
    with pytest.raises(KeyError, match="adam"):
        plan_runs(preset, 1437, optimizers=["adam"])


def test_warmup_rules_and_the_lars_recipes() -> None:
    assert warmup_epochs(2, 1024, 64, "fixed", 15) == 2
    assert warmup_epochs(2, 256, 64, "sqrt", 15) == pytest.approx(4.0)
    assert warmup_epochs(2, 32, 64, "sqrt", 15) == 2  # never below the base warmup
    assert warmup_epochs(2, 1437, 64, "sqrt", 15) == 7.5  # at most half the budget
    with pytest.raises(ValueError, match="warmup"):
        warmup_epochs(2, 64, 64, "cubic", 15)
    preset = PRESETS["default"]
    for recipe, scaling, warmup in (("linear", "linear", "fixed"), ("mlperf", "sqrt", "sqrt")):
        variant = with_lars_recipe(preset, recipe)
        spec = variant.optimizer("lars")
        assert (spec.lr_scaling, spec.warmup, spec.trust_coefficient) == (scaling, warmup, 0.001)
        assert [o.label for o in variant.optimizers] == [o.label for o in preset.optimizers]
        run = next(r for r in plan_runs(variant, 1437, optimizers=["lars"], batches=[256]) if r.lr_factor == 1.0)
        # the trainer's epochs of ⌈N/B⌉ updates, converted so the warmup is that many epochs of N samples
        assert run.config["warmup_epochs"] * math.ceil(1437 / 256) == pytest.approx(
            warmup_epochs(preset.warmup_epochs, 256, 64, warmup, preset.epochs) * 1437 / 256)
        assert run.config["trust_coefficient"] == 0.001
    with pytest.raises(ValueError, match="recipe"):
        with_lars_recipe(preset, "cosine")
    both = PRESETS["lars-recipes"]
    assert {o.label: o.warmup for o in both.optimizers} == {"sgd": "fixed", "lars": "fixed", "lars_mlperf": "sqrt"}


def test_presets_reject_a_grid_that_is_not_logarithmic() -> None:
    preset = PRESETS["quick"]
    with pytest.raises(ValueError, match="log grid"):
        dataclasses.replace(preset, lr_factors=(0.5, 1.0, 3.0), lr_step=3.0)
    with pytest.raises(ValueError, match="seeds"):
        dataclasses.replace(preset, seeds=(1, 1))
    with pytest.raises(ValueError, match="max_lr_extensions"):
        dataclasses.replace(preset, max_lr_extensions=-1)


def test_imagenet_plan_accumulates_on_a_fixed_device_batch() -> None:
    preset = PRESETS["imagenet"]
    runs = plan_runs(preset, preset.train_size)
    assert {r.config["device_batch"] for r in runs} == {256}
    assert max(r.batch for r in runs) == 1_281_167 and min(r.batch for r in runs) == 1024
    for r in (r for r in runs if r.budget == "epochs"):
        assert r.steps == round(90 * preset.train_size / r.batch) == r.config["max_steps"]
        assert r.config["epochs"] == math.ceil(r.steps / math.ceil(preset.train_size / r.batch)) <= 90
    assert all("data" not in r.config for r in runs)  # --data at launch; no folds outside the digits


def test_config_hash_ignores_output_fields_only() -> None:
    config = dict(plan_runs(PRESETS["quick"], 1437)[0].config)
    key = config_hash(config)
    for name in NON_RESULT_FIELDS:
        assert config_hash({**config, name: "elsewhere"}) == key
    assert config_hash({**config, "lr": config["lr"] * 2}) != key
    assert config_hash({**config, "seed": 1}) != key
    assert config_hash(dict(reversed(list(config.items())))) == key


def test_cache_round_trip_and_atomic_replace(tmp_path) -> None:
    cache = ResultCache(tmp_path / "cache")
    assert cache.get("abc") is None
    cache.put("abc", {"result": {"top1": 0.5}})
    assert cache.get("abc") == {"result": {"top1": 0.5}, "key": "abc"}
    assert cache.keys() == ["abc"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp files left

    class Unserialisable:
        def __repr__(self) -> str:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_json_atomic(cache.path("abc"), {"x": Unserialisable()})
    assert json.loads(cache.path("abc").read_text())["result"] == {"top1": 0.5}  # old record intact
    assert sorted(os.listdir(tmp_path / "cache")) == ["abc.json"]


def test_cache_rejects_corrupt_or_misnamed_records(tmp_path) -> None:
    cache = ResultCache(tmp_path)
    cache.path("bad").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        cache.get("bad")
    cache.path("other").write_text(json.dumps({"key": "different"}))
    with pytest.raises(ValueError, match="different"):
        cache.get("other")
