"""Sweep planning and execution: preset → list of trainer configs → cached run records.

Two budgets are planned (Hoffer et al. 2017 compare them):
- "epochs": every batch × optimizer × lr factor trains for `preset.epochs` epochs, so a batch B
  takes ⌈N/B⌉·epochs updates (N = training-set size);
- "steps": `preset.diffusion_optimizer` at lr factor 1 trains every diffusion batch for exactly
  `preset.fixed_steps` updates, so larger batches see more epochs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.study.cache import ResultCache, config_hash
from train.study.presets import Preset, scaled_lr

BUDGETS = ("epochs", "steps")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class PlannedRun:
    """One trainer run of the sweep: its place in the grid and its full trainer config."""

    key: str
    budget: str
    optimizer: str
    batch: int
    lr_factor: float
    lr: float
    config: dict[str, Any]

    def describe(self) -> str:
        """One line for progress output."""
        return (f"{self.budget:>6} budget  B={self.batch:<8} {self.optimizer:<9} "
                f"lr={self.lr:.4g} (×{self.lr_factor:.3g})  [{self.key}]")


@dataclass(frozen=True)
class Engine:
    """What trains the runs: the contract's config class and train function, and the training-set size."""

    name: str
    config_cls: type
    train: Callable[[Any], Any]
    train_size: Callable[[str], int]


def _count_train_images(data: str) -> int:
    if data == "default":
        try:
            from train.data import default_dataset
        except ImportError as exc:
            raise SystemExit(f"--data default: the trainer offers no train.data.default_dataset() to locate the "
                             f"bundled ImageFolder ({exc}); pass --data PATH to that folder") from exc
        root = Path(default_dataset())
    else:
        root = Path(data)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise SystemExit(f"--data: {root} has no train/ folder (expected an ImageFolder root with train/ and val/)")
    count = sum(1 for p in train_dir.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if count == 0:
        raise SystemExit(f"--data: no images under {train_dir}/<class>/")
    return count


def resolve_engine() -> Engine:
    """The trainer: train.config.TrainConfig and train.engine.train."""
    from train.config import TrainConfig
    from train.engine import train

    return Engine("train.engine", TrainConfig, train, _count_train_images)


def _run_config(preset: Preset, label: str, batch: int, factor: float, budget: str,
                train_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    spec = preset.optimizer(label)
    lr = factor * scaled_lr(spec.base_lr, batch, preset.base_batch, spec.lr_scaling)
    device_batch = batch if preset.device_batch is None else min(batch, preset.device_batch)
    if budget == "epochs":
        epochs: float = preset.epochs
        max_steps = None
    else:
        steps_per_epoch = math.ceil(train_size / batch)
        epochs = math.ceil(preset.fixed_steps / steps_per_epoch)
        max_steps = preset.fixed_steps
    config: dict[str, Any] = {
        **preset.train,
        "optimizer": spec.optimizer,
        "global_batch": batch,
        "device_batch": device_batch,
        "lr": lr,
        "base_lr": spec.base_lr * factor,
        "lr_scaling": spec.lr_scaling,
        "base_batch": preset.base_batch,
        "warmup_epochs": preset.warmup_epochs,
        "decay": preset.decay,
        "poly_power": preset.poly_power,
        "label_smoothing": preset.label_smoothing,
        "epochs": epochs,
        "max_steps": max_steps,
        "seed": preset.seed,
        "weight_decay": spec.weight_decay,
        "momentum": spec.momentum,
        "nesterov": spec.nesterov,
        "track_diffusion": True,
        "noise_scale": True,
        "target_accuracy": preset.target_accuracy,
        "quiet": True,
    }
    config.update(overrides)
    return config


def plan_runs(preset: Preset, train_size: int, overrides: dict[str, Any] | None = None,
              optimizers: Iterable[str] | None = None, batches: Iterable[int] | None = None,
              engine: str = "train.engine") -> list[PlannedRun]:
    """Every run of `preset` for a training set of `train_size` images, fixed-epoch grid first.
    Run keys hash the config together with the `engine` name, so two trainers never share records.

    `overrides` replace trainer-config fields in every run (e.g. data path, device); `optimizers`
    and `batches` restrict the grid to a subset (the cache is shared, so a later full run reuses them).
    """
    overrides = dict(overrides or {})
    labels = [o.label for o in preset.optimizers] if optimizers is None else list(optimizers)
    for label in labels:
        preset.optimizer(label)
    grid = preset.resolve_batches(train_size)
    if batches is not None:
        wanted = list(batches)
        grid = tuple(b for b in grid if b in wanted) or tuple(wanted)
    diffusion = tuple(b for b in (preset.diffusion_batches or grid) if batches is None or b in grid)
    plan: list[tuple[str, str, int, float]] = [
        ("epochs", label, batch, factor) for batch in grid for label in labels for factor in preset.lr_factors
    ]
    if preset.diffusion_optimizer in labels:
        plan += [("steps", preset.diffusion_optimizer, batch, 1.0) for batch in diffusion]
    runs = []
    for budget, label, batch, factor in plan:
        config = _run_config(preset, label, batch, factor, budget, train_size, overrides)
        key = config_hash({**config, "_engine": engine})
        runs.append(PlannedRun(key, budget, label, batch, factor, config["lr"], config))
    return runs


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def run_record(run: PlannedRun, result: Any) -> dict[str, Any]:
    """The cache record of a finished run: its grid position, config and the trainer's RunResult."""
    return {
        "budget": run.budget,
        "optimizer": run.optimizer,
        "batch": run.batch,
        "lr_factor": run.lr_factor,
        "lr": run.lr,
        "config": _jsonable(run.config),
        "result": _jsonable(result),
    }


@dataclass
class SweepOutcome:
    """Records of every planned run, in plan order, and how many were trained now vs. read from cache."""

    records: list[dict[str, Any]]
    executed: int
    cached: int


def execute(runs: list[PlannedRun], cache: ResultCache, run_dir: Path, engine: Engine,
            log: Callable[[str], None] = print, write: bool = True, jobs: int = 1) -> SweepOutcome:
    """Train every run without a cached record with `engine` and return all records, in plan order.

    Each run trains into `run_dir/<key>/` with resume on, so a run killed half-way continues from
    the trainer's last checkpoint where the trainer keeps one. `write=False` (non-zero ranks under
    torchrun) trains but never writes the cache. `jobs` > 1 trains that many runs at once in worker
    processes of cpu_count // jobs intra-op threads each (small CPU models gain nothing from a
    second thread, so two one-thread runs on two cores take half the time of one after the other);
    the workers die with the study, so a killed study leaves no run behind it writing.
    """
    records: dict[int, dict[str, Any]] = {}
    pending = []
    for i, run in enumerate(runs):
        record = cache.get(run.key)
        if record is not None:
            records[i] = record
        else:
            pending.append(i)
    cached = len(records)
    start = time.perf_counter()

    def finish(i: int, result: Any, seconds: float) -> None:
        run = runs[i]
        record = {**run_record(run, result), "key": run.key, "engine": engine.name}
        if write:
            cache.put(run.key, record)
        records[i] = record
        res = record["result"]
        log(f"[{len(records)}/{len(runs)}] {run.describe()}\n    top1={res.get('top1')} steps={res.get('steps')} "
            f"{seconds:.1f}s (study {time.perf_counter() - start:.0f}s)")

    def config(i: int) -> dict[str, Any]:
        return {**runs[i].config, "out": str(run_dir / runs[i].key), "resume": True}

    if jobs <= 1 or len(pending) <= 1:
        for i in pending:
            result, seconds = _train_one(engine, config(i))
            finish(i, result, seconds)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                    initargs=(threads,)) as pool:
            futures = {pool.submit(_train_one, engine, config(i)): i for i in pending}
            for future in concurrent.futures.as_completed(futures):
                result, seconds = future.result()
                finish(futures[future], result, seconds)
    return SweepOutcome([records[i] for i in range(len(runs))], len(pending), cached)


def _train_one(engine: Engine, config: dict[str, Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = engine.train(engine.config_cls(**config))
    return result, time.perf_counter() - t0


def _worker_init(threads: int) -> None:
    """A sweep worker: `threads` intra-op threads, and killed when the study process dies (Linux)."""
    import torch

    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
