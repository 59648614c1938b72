"""The study's stand-in trainer for the bundled digits data, used only while `train.engine` is absent.

It implements the trainer contract (`TrainConfig` fields, `train(cfg) -> RunResult`) for
`data="default"`, `model="default"` on one device, with the same large-batch recipe, so the study,
its cache and its report run end to end; the real trainer (train/engine.py) replaces it as soon as
it can be imported (`resolve_engine`). Differences from the real trainer, by design: the images are
sklearn's 8×8 digits held as tensors (no JPEG decode), augmented by random ±1-pixel shifts; no AMP,
DDP, accumulation or checkpoints (a run takes seconds; a killed run restarts).

Recipe, per optimizer update t = 1..T (T = min(⌈epochs·⌈N/B⌉⌉, max_steps)), W warmup updates:
    lr_t = lr·t/W                                  for t ≤ W
    lr_t = lr·(1 − (t−W−1)/(T−W))^p               for t > W   (poly; cosine: lr·½(1+cos(π(t−W−1)/(T−W))))
with label-smoothed cross-entropy and fastlars.param_groups: biases and norm parameters get no
weight decay and (LARS/LAMB) no trust ratio.

Metrics: ‖w_t − w_0‖ over all parameters; B_simple = tr(Σ)/|G|² from the two-batch estimator of
McCandlish et al. 2018 with B_small = the first half of the batch and B_big = the batch,
    |G|² ≈ (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small),
    tr(Σ) ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big),
each smoothed by a bias-corrected EMA with a time constant of 100 updates, measured every
k = max(1, T // 200) updates (the half-batch gradient is an extra backward pass that does not
touch the weights, BN running statistics or the optimizer).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastlars

DIGITS_VAL_FRACTION = 0.2


@dataclass
class TrainConfig:
    """The trainer contract's fields with its defaults (see train/config.py once it exists)."""

    data: str = "default"
    loader: str = "cpu"
    model: str = "default"
    optimizer: str = "lars"
    global_batch: int = 256
    device_batch: int | None = None
    lr: float | None = None
    base_lr: float | None = None
    lr_scaling: str = "linear"
    base_batch: int = 256
    warmup_epochs: float = 5.0
    decay: str = "poly"
    poly_power: float = 2.0
    label_smoothing: float = 0.1
    epochs: float = 90.0
    max_steps: int | None = None
    amp: str = "off"
    channels_last: bool = False
    seed: int = 0
    workers: int = 2
    out: str = "runs/default"
    resume: bool = False
    checkpoint_every: int = 0
    eval_every: int = 0
    weight_decay: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    track_diffusion: bool = True
    noise_scale: bool = True
    target_accuracy: float | None = None
    device: str = "auto"
    quiet: bool = False


@dataclass
class RunResult:
    """The trainer contract's result of one run."""

    top1: float
    top5: float
    steps: int
    epochs: float
    wall_time_s: float
    images_per_s: float
    optimizer_share: float
    steps_to_target: int | None
    history: list[dict[str, Any]]
    config: dict[str, Any]


@cache
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits as (x_train, y_train, x_val, y_val): 1×8×8 float images in [0, 1], a
    stratified 80/20 split with a fixed seed (1,437 training and 360 validation images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(range(len(y)), test_size=DIGITS_VAL_FRACTION, random_state=0,
                                          stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_val], y[idx_val]


def train_size(data: str) -> int:
    """Training-set size of `data` (only "default" is served by this trainer)."""
    if data != "default":
        raise ValueError(f"data: the study's stand-in trainer serves only 'default' (digits), got {data!r}")
    return len(digits_split()[1])


def small_cnn() -> nn.Module:
    """Conv(1→16) BN ReLU, Conv(16→32, stride 2) BN ReLU, global average pool, Linear(32→10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _check(cfg: TrainConfig) -> None:
    if cfg.data != "default":
        raise ValueError(f"data: the study's stand-in trainer serves only 'default' (digits), got {cfg.data!r}")
    if cfg.model != "default":
        raise ValueError(f"model: the study's stand-in trainer has only 'default' (small CNN), got {cfg.model!r}")
    if cfg.amp != "off":
        raise ValueError(f"amp: the study's stand-in trainer runs fp32 only, got {cfg.amp!r}")
    if cfg.optimizer not in ("sgd", "lars", "lamb", "adamw"):
        raise ValueError(f"optimizer must be one of sgd, lars, lamb, adamw, got {cfg.optimizer!r}")
    if cfg.decay not in ("poly", "cosine", "step"):
        raise ValueError(f"decay must be one of poly, cosine, step, got {cfg.decay!r}")
    if cfg.global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {cfg.global_batch}")
    if cfg.lr is None or not cfg.lr > 0:
        raise ValueError(f"lr must be given and positive for the stand-in trainer, got {cfg.lr}")


def lr_at(t: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """The learning rate of update t (1-based) of `total`, with `warmup` linear-warmup updates."""
    assert cfg.lr is not None
    if t <= warmup:
        return cfg.lr * t / warmup
    progress = (t - warmup - 1) / max(1, total - warmup)
    if cfg.decay == "poly":
        return cfg.lr * (1.0 - progress) ** cfg.poly_power
    if cfg.decay == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * 0.1 ** int(progress * 3)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    adaptive = cfg.optimizer in ("lamb", "adamw")
    wd = cfg.weight_decay if cfg.weight_decay is not None else (0.01 if adaptive else 1e-4)
    groups = fastlars.param_groups(model, weight_decay=wd)
    if cfg.optimizer == "lars":
        return fastlars.LARS(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "lamb":
        return fastlars.LAMB(groups, lr=cfg.lr)
    for g in groups:
        g.pop("adapt", None)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image translated by a random (dy, dx) ∈ {−1, 0, 1}², zero-filled."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2)
    out = padded.gather(2, rows.to(x.device))
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols.to(x.device))


def _grad_sq(model: nn.Module) -> float:
    return float(sum(p.grad.detach().float().pow(2).sum() for p in model.parameters() if p.grad is not None))


def _small_batch_grad_sq(model: nn.Module, x: torch.Tensor, y: torch.Tensor, smoothing: float) -> float:
    """|∇L|² on (x, y) without changing weights, BN running statistics or the stored gradients."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y, label_smoothing=smoothing), params)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return float(sum(g.float().pow(2).sum() for g in grads))


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    top5 = model(x).topk(5, dim=1).indices
    model.train()
    hit1 = (top5[:, 0] == y).float().mean().item()
    hit5 = (top5 == y[:, None]).any(dim=1).float().mean().item()
    return hit1, hit5


def train(cfg: TrainConfig) -> RunResult:
    """Train the small CNN on digits under `cfg` and return the contract's RunResult."""
    _check(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    x_train, y_train, x_val, y_val = (t.to(device) for t in digits_split())
    n, batch = len(y_train), cfg.global_batch
    if batch > n:
        raise ValueError(f"global_batch ({batch}) exceeds the training set ({n})")
    per_epoch = math.ceil(n / batch)
    total = math.ceil(cfg.epochs * per_epoch)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = round(cfg.warmup_epochs * per_epoch)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = small_cnn().to(device)
    opt = _optimizer(cfg, model)
    w0 = [p.detach().float().clone() for p in model.parameters()]
    log_steps = {round(s) for s in torch.logspace(0, math.log10(total), 60).tolist()} | {total}
    noise_every = max(1, total // 200)
    beta = 0.99 ** noise_every
    ema_g2 = ema_tr = 0.0
    ema_n = 0
    b_simple: float | None = None
    seen = 0
    history: list[dict[str, Any]] = []
    steps_to_target = None
    opt_time = step_time = 0.0
    start = time.perf_counter()
    t = 0
    epoch = 0
    while t < total:
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, batch):
            if t >= total:
                break
            t += 1
            t0 = time.perf_counter()
            idx = order[i:i + batch]
            x, y = _shift(x_train[idx], gen), y_train[idx]
            lr = lr_at(t, total, warmup, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            seen += len(y)
            if cfg.noise_scale and len(y) >= 4 and t % noise_every == 0:
                big = len(y)
                small = big // 2
                g2_big = _grad_sq(model)
                g2_small = _small_batch_grad_sq(model, x[:small], y[:small], cfg.label_smoothing)
                g2 = (big * g2_big - small * g2_small) / (big - small)
                tr = (g2_small - g2_big) / (1.0 / small - 1.0 / big)
                ema_g2, ema_tr, ema_n = beta * ema_g2 + (1 - beta) * g2, beta * ema_tr + (1 - beta) * tr, ema_n + 1
                corr = 1 - beta ** ema_n
                if ema_g2 > 0:
                    b_simple = (ema_tr / corr) / (ema_g2 / corr)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt_time += t2 - t1
            step_time += t2 - t0
            epoch_done = i + batch >= n
            if t in log_steps or epoch_done or (cfg.eval_every and t % cfg.eval_every == 0):
                entry: dict[str, Any] = {"step": t, "epoch": epoch + min(i + batch, n) / n, "lr": lr,
                                         "loss": loss.item(), "b_simple": b_simple, "top1": None}
                if cfg.track_diffusion:
                    entry["w_dist"] = math.sqrt(sum(float((p.detach().float() - p0).pow(2).sum())
                                                    for p, p0 in zip(model.parameters(), w0)))
                top1, _ = _evaluate(model, x_val, y_val)
                entry["top1"] = top1
                if steps_to_target is None and cfg.target_accuracy is not None and top1 >= cfg.target_accuracy:
                    steps_to_target = t
                history.append(entry)
        epoch += 1
    wall = time.perf_counter() - start
    top1, top5 = _evaluate(model, x_val, y_val)
    return RunResult(top1=top1, top5=top5, steps=t, epochs=t / per_epoch, wall_time_s=wall,
                     images_per_s=seen / wall, optimizer_share=opt_time / step_time if step_time else 0.0,
                     steps_to_target=steps_to_target, history=history, config=dataclasses.asdict(cfg))
