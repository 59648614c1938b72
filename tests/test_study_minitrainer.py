"""The study's stand-in trainer: schedule, augmentation, step counts, metrics and input errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from train.study import minitrainer as mt


def test_lr_schedule_warmup_then_poly_and_cosine() -> None:
    cfg = mt.TrainConfig(lr=2.0, decay="poly", poly_power=2.0)
    total, warmup = 100, 10
    assert mt.lr_at(1, total, warmup, cfg) == pytest.approx(0.2)
    assert mt.lr_at(10, total, warmup, cfg) == pytest.approx(2.0)
    assert mt.lr_at(11, total, warmup, cfg) == pytest.approx(2.0)
    assert mt.lr_at(100, total, warmup, cfg) == pytest.approx(2.0 * (1 - 89 / 90) ** 2)
    lrs = [mt.lr_at(t, total, warmup, cfg) for t in range(11, 101)]
    assert all(a > b for a, b in itertools.pairwise(lrs))
    cos = mt.TrainConfig(lr=2.0, decay="cosine")
    assert mt.lr_at(11 + 45, total, warmup, cos) == pytest.approx(1.0)
    assert mt.lr_at(5, total, 0, cfg) == pytest.approx(2.0 * (1 - 4 / 100) ** 2)


def test_shift_is_a_per_image_translation_by_at_most_one_pixel() -> None:
    x = torch.rand(64, 1, 8, 8)
    out = mt._shift(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert matches, f"image {i} is not a translation of its input"
        seen.add(matches[0])
    assert len(seen) > 4  # shifts vary per image


def test_a_run_counts_steps_and_logs_the_metrics() -> None:
    cfg = mt.TrainConfig(optimizer="lamb", global_batch=512, lr=0.05, epochs=2, warmup_epochs=1,
                         target_accuracy=0.0, device="cpu")
    result = mt.train(cfg)
    assert result.steps == 2 * math.ceil(1437 / 512) and result.epochs == pytest.approx(2.0)
    assert result.steps_to_target == result.history[0]["step"]
    assert [h["step"] for h in result.history] == sorted({h["step"] for h in result.history})
    assert all(h["w_dist"] > 0 and h["top1"] is not None for h in result.history)
    assert 0 < result.optimizer_share < 1 and result.images_per_s > 0
    assert 0.0 <= result.top1 <= result.top5 <= 1.0
    capped = mt.train(mt.TrainConfig(optimizer="sgd", global_batch=256, lr=0.1, epochs=5, max_steps=7,
                                     warmup_epochs=0, device="cpu", noise_scale=False, track_diffusion=False))
    assert capped.steps == 7 and all("w_dist" not in h and h["b_simple"] is None for h in capped.history)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("data", "/some/imagenet", "data"), ("model", "resnet50", "model"), ("amp", "bf16", "amp"),
    ("optimizer", "adagrad", "optimizer"), ("lr", None, "lr"), ("global_batch", 4096, "global_batch"),
    ("decay", "linear", "decay"),
])
def test_bad_config_raises_naming_the_field(field: str, value: object, match: str) -> None:
    cfg = mt.TrainConfig(global_batch=64, lr=0.1, epochs=1, device="cpu")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        mt.train(cfg)
