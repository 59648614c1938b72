"""Sweep planning and execution: preset → trainer configs → cached run records.

Two budgets are planned (Hoffer et al. 2017 compare them):
- "epochs": every batch × optimizer × LR factor × seed trains for `preset.epochs` epochs of samples:
  a batch B takes T(B) = round(epochs · N / B) updates (N = training-set size), so every batch sees
  the same number of samples (within B/2), with no bonus from the trainer's wrap-around of a partial
  last batch (its epoch of ⌈N/B⌉ updates is cut by max_steps, and the warmup is given in the same
  sample-epochs); the LR factors of each (optimizer, batch) start at the preset's grid and grow by
  the search of train.study.search as its runs finish; once a cell's search is over, its chosen LR
  trains on the preset's held-out seeds (phase "heldout"; the search runs are phase "search");
- "steps": `preset.diffusion_optimizer` at lr factor 1 trains every diffusion batch, each seed, for
  exactly `preset.fixed_steps` updates, so larger batches see more epochs.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.study import analysis, search
from train.study.cache import ResultCache, config_hash
from train.study.presets import Preset, scaled_lr, warmup_epochs

BUDGETS = ("epochs", "steps")
STEP_COST_IMAGES = 70
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
    seed: int
    steps: int
    config: dict[str, Any]
    phase: str = "search"

    def describe(self) -> str:
        """One line naming the run."""
        return (f"{self.budget:>6} budget  B={self.batch:<8} {self.optimizer:<11} "
                f"lr={self.lr:.4g} (×{self.lr_factor:.3g})  seed {self.seed} {self.phase}  [{self.key}]")

    @property
    def work(self) -> int:
        """Estimated cost in image-equivalents: steps · (batch + STEP_COST_IMAGES), every image its
        forward and backward pass, every update a fixed overhead (optimizer step, data-loader and
        Python work per micro-batch) that on the 2-core EPYC with the small digits CNN costs about as
        much as 70 images."""
        return self.steps * (self.batch + STEP_COST_IMAGES)

    @property
    def cell(self) -> tuple[str, str, int]:
        """(budget, optimizer, batch): the runs an LR search compares."""
        return self.budget, self.optimizer, self.batch


@dataclass(frozen=True)
class Engine:
    """What trains the runs: the contract's config class and train function, and the training-set size."""

    name: str
    config_cls: type
    train: Callable[[Any], Any]
    train_size: Callable[[str], int]


def _count_train_images(data: str) -> int:
    from train.data import default_dataset, digits_fold_of, is_default_data

    root = Path(default_dataset(fold=digits_fold_of(data))) if is_default_data(data) else Path(data)
    from train.data import idx

    files = idx.idx_files(root)
    if files is not None:
        return len(idx.read_idx(files["train_labels"]))
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


def _run_config(preset: Preset, label: str, batch: int, factor: float, budget: str, seed: int,
                train_size: int, overrides: dict[str, Any], phase: str = "search") -> tuple[dict[str, Any], int]:
    """The trainer config of one run and the updates it takes."""
    spec = preset.optimizer(label)
    lr = factor * scaled_lr(spec.base_lr, batch, preset.base_batch, spec.lr_scaling)
    device_batch = batch if preset.device_batch is None else min(batch, preset.device_batch)
    steps_per_epoch = math.ceil(train_size / batch)
    warmup = warmup_epochs(preset.warmup_epochs, batch, preset.base_batch, spec.warmup, preset.epochs)
    if budget == "epochs":
        max_steps = steps = max(1, round(preset.epochs * train_size / batch))
        epochs: float = math.ceil(steps / steps_per_epoch)
        # the trainer counts warmup in its epochs of ⌈N/B⌉ updates; this is `warmup` epochs of N samples
        warmup *= train_size / batch / steps_per_epoch
    else:
        epochs = math.ceil(preset.fixed_steps / steps_per_epoch)
        max_steps = steps = preset.fixed_steps
    config: dict[str, Any] = {
        **preset.train,
        "optimizer": spec.optimizer,
        "global_batch": batch,
        "device_batch": device_batch,
        "lr": lr,
        "base_lr": spec.base_lr * factor,
        "lr_scaling": spec.lr_scaling,
        "base_batch": preset.base_batch,
        "warmup_epochs": warmup,
        "decay": preset.decay,
        "poly_power": preset.poly_power,
        "label_smoothing": preset.label_smoothing,
        "epochs": epochs,
        "max_steps": max_steps,
        "seed": seed,
        "weight_decay": spec.weight_decay,
        "momentum": spec.momentum,
        "nesterov": spec.nesterov,
        "trust_coefficient": spec.trust_coefficient,
        "track_diffusion": True,
        # B_simple is measured along the diffusion optimizer's fixed-epoch search runs at the scaled LR only;
        # its extra half-batch gradient costs up to half a run's compute
        "noise_scale": (budget == "epochs" and factor == 1.0 and label == preset.diffusion_optimizer
                        and phase == "search"),
        "target_accuracy": preset.target_accuracy,
        "quiet": True,
    }
    if spec.optim_state != "fp32":
        config["optim_state"] = spec.optim_state
        if preset.optim_state_min_size is not None:
            config["optim_state_min_size"] = preset.optim_state_min_size
    config.update(overrides)
    config["data"] = preset.data_for_seed(config["data"], seed) if "data" in config else None
    if config["data"] is None:
        del config["data"]
    return config, steps


def planned_run(preset: Preset, label: str, batch: int, factor: float, budget: str, seed: int, train_size: int,
                overrides: dict[str, Any], engine: str, phase: str = "search") -> PlannedRun:
    """One run of the sweep. Its key hashes the config together with the `engine` name, so two trainers
    never share records."""
    config, steps = _run_config(preset, label, batch, factor, budget, seed, train_size, overrides, phase)
    key = config_hash({**config, "_engine": engine})
    return PlannedRun(key, budget, label, batch, factor, config["lr"], seed, steps, config, phase)


def plan_runs(preset: Preset, train_size: int, overrides: dict[str, Any] | None = None,
              optimizers: Iterable[str] | None = None, batches: Iterable[int] | None = None,
              engine: str = "train.engine") -> list[PlannedRun]:
    """The runs `preset` starts with for a training set of `train_size` images: the fixed-epoch grid
    (batch, optimizer, initial LR factor, seed), then the fixed-step runs. `lr_search` adds the rest.

    `overrides` replace trainer-config fields in every run (e.g. data path, device); `optimizers`
    and `batches` restrict the grid to a subset (the cache is shared, so a later full run reuses them).
    A preset with fixed LRs (Preset.fixed_lr_factors) plans its held-out runs at those LRs, and nothing else.
    """
    overrides = dict(overrides or {})
    labels = [o.label for o in preset.optimizers] if optimizers is None else list(optimizers)
    for label in labels:
        preset.optimizer(label)
    grid = preset.resolve_batches(train_size)
    if batches is not None:
        wanted = list(batches)
        grid = tuple(b for b in grid if b in wanted) or tuple(wanted)
    if preset.fixed_lr_factors:
        return [planned_run(preset, label, batch, preset.fixed_lr_factor(label, batch), "epochs", seed, train_size,
                            overrides, engine, "heldout")
                for batch in grid for label in labels for seed in preset.heldout_seeds(batch)]
    diffusion = tuple(b for b in (preset.diffusion_batches or grid) if batches is None or b in grid)
    plan: list[tuple[str, str, int, float, int]] = [
        ("epochs", label, batch, factor, seed)
        for batch in grid for label in labels for factor in preset.lr_factors for seed in preset.seeds]
    if preset.diffusion_optimizer in labels:
        plan += [("steps", preset.diffusion_optimizer, batch, 1.0, seed)
                 for batch in diffusion for seed in preset.seeds]
    return [planned_run(preset, label, batch, factor, budget, seed, train_size, overrides, engine)
            for budget, label, batch, factor, seed in plan]


FollowUp = Callable[[Sequence[PlannedRun], Mapping[str, dict[str, Any]]], list[PlannedRun]]


def lr_search(preset: Preset, train_size: int, overrides: dict[str, Any] | None = None,
              engine: str = "train.engine") -> FollowUp:
    """The follow-up that extends the LR grid: for every fixed-epoch (optimizer, batch) whose planned
    search runs have all finished, the runs of search.next_factor's factor for every search seed; when
    there is none (the best is inside the range or the cell's extensions are spent), the search is
    over and the best factor's held-out runs (Preset.heldout_seeds) join the plan."""
    overrides = dict(overrides or {})

    def follow_up(planned: Sequence[PlannedRun], records: Mapping[str, dict[str, Any]]) -> list[PlannedRun]:
        cells: dict[tuple[str, str, int], list[PlannedRun]] = {}
        for run in planned:
            if run.budget == "epochs" and run.phase == "search":
                cells.setdefault(run.cell, []).append(run)
        new = []
        for (_, label, batch), runs in cells.items():
            if any(r.key not in records for r in runs):
                continue
            scores = analysis.factor_scores(analysis.trials(records[r.key] for r in runs))
            factor = search.next_factor(scores, preset.lr_factors, preset.lr_step, preset.max_lr_extensions)
            if factor is not None:
                new += [planned_run(preset, label, batch, factor, "epochs", seed, train_size, overrides, engine)
                        for seed in preset.seeds]
                continue
            chosen = search.best(scores).factor
            new += [planned_run(preset, label, batch, chosen, "epochs", seed, train_size, overrides, engine, "heldout")
                    for seed in preset.heldout_seeds(batch)]
        return new

    return follow_up


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


def _position(run: PlannedRun) -> dict[str, Any]:
    return {"budget": run.budget, "optimizer": run.optimizer, "batch": run.batch, "lr_factor": run.lr_factor,
            "lr": run.lr, "seed": run.seed, "phase": run.phase}


def run_record(run: PlannedRun, result: Any) -> dict[str, Any]:
    """The cache record of a finished run: its grid position, config and the trainer's RunResult."""
    return {**_position(run), "config": _jsonable(run.config), "result": _jsonable(result)}


@dataclass
class SweepOutcome:
    """Records of every planned run (the initial ones and every follow-up) ordered by budget, batch,
    optimizer (in plan order), LR factor and seed, however the runs were scheduled, and how many were
    trained now vs. read from cache."""

    records: list[dict[str, Any]]
    executed: int
    cached: int


class Progress:
    """What `execute` reports as it goes: `planned(run)` when a run joins the plan, `finished(run,
    record, cached)` when its record exists. The base class reports nothing."""

    def planned(self, run: PlannedRun) -> None:
        """A run joined the plan."""

    def finished(self, run: PlannedRun, record: dict[str, Any], cached: bool) -> None:
        """A run's record exists (trained now, or read from the cache when `cached`)."""


def execute(runs: list[PlannedRun], cache: ResultCache, run_dir: Path, engine: Engine,
            follow_up: FollowUp | None = None, progress: Progress | None = None, write: bool = True,
            jobs: int = 1, tensorboard: Path | None = None) -> SweepOutcome:
    """Train every planned run without a cached record with `engine` and return all records.

    The initial runs train longest first (PlannedRun.work), so the last ones to finish are short and
    no core idles long at the end; after each finished run, `follow_up(planned, records)` may add runs
    (the LR search), which train before the rest of the queue, so a cell's search does not wait for
    the whole grid. Each run trains into `run_dir/<key>/` with resume on, so a run killed half-way
    continues from the trainer's last checkpoint where the trainer keeps one. `write=False` (non-zero
    ranks under torchrun, which train every run with rank 0 and so plan the same follow-ups) trains
    but never writes the cache. `jobs` > 1 trains that many runs at once in worker processes of
    cpu_count // jobs intra-op threads each (small CPU models gain nothing from a second thread, so two
    one-thread runs on two cores take half the time of one after the other); the workers die with the
    study, so a killed study leaves no run behind it writing. `tensorboard`: each trained run writes its
    TensorBoard view into `tensorboard/<key>/`, so the runs of a study sit side by side there (None: off).
    """
    progress = progress or Progress()
    planned: list[PlannedRun] = []
    known: set[str] = set()
    records: dict[str, dict[str, Any]] = {}
    queue: list[PlannedRun] = []
    counts = {"executed": 0, "cached": 0}

    def add(new_runs: Iterable[PlannedRun], first: bool) -> None:
        fresh = []
        for run in new_runs:
            if run.key in known:
                continue
            known.add(run.key)
            planned.append(run)
            progress.planned(run)
            record = cache.get(run.key)
            if record is not None:
                # the key hashes the config only: a record another preset wrote under another label is this run's
                records[run.key] = {**record, **_position(run)}
                counts["cached"] += 1
                progress.finished(run, record, cached=True)
            else:
                fresh.append(run)
        queue[:0 if first else len(queue)] = fresh

    def grow() -> None:
        while follow_up is not None:
            before = len(planned)
            add(follow_up(planned, records), first=True)
            if len(planned) == before:
                return

    def finish(run: PlannedRun, result: Any) -> None:
        record = {**run_record(run, result), "key": run.key, "engine": engine.name}
        if write:
            cache.put(run.key, record)
        records[run.key] = record
        counts["executed"] += 1
        progress.finished(run, record, cached=False)
        grow()

    def config(run: PlannedRun) -> dict[str, Any]:
        board = "off" if tensorboard is None else str(tensorboard / run.key)
        return {**run.config, "out": str(run_dir / run.key), "resume": True, "tensorboard": board}

    add(sorted(runs, key=lambda r: -r.work), first=False)
    grow()
    if jobs <= 1 or not queue:
        while queue:
            run = queue.pop(0)
            finish(run, _train_one(engine, config(run))[0])
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                    initargs=(threads,)) as pool:
            in_flight: dict[concurrent.futures.Future, PlannedRun] = {}
            while queue or in_flight:
                while queue and len(in_flight) < jobs:
                    run = queue.pop(0)
                    in_flight[pool.submit(_train_one, engine, config(run))] = run
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    finish(in_flight.pop(future), future.result()[0])
    labels = {label: i for i, label in enumerate(dict.fromkeys(r.optimizer for r in planned))}
    ordered = sorted(planned, key=lambda r: (BUDGETS.index(r.budget), r.phase != "search", r.batch,
                                             labels[r.optimizer], r.lr_factor, r.seed))
    return SweepOutcome([records[r.key] for r in ordered], counts["executed"], counts["cached"])


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
