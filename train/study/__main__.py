"""`python -m train.study`: the batch-size scaling study (sweep, cache, analysis, report).

    python -m train.study --preset default            # bundled digits data on CPU, ≤ 10 min on 2 cores
    python -m train.study --preset quick              # smoke test, ≈ 30 s
    python -m train.study --preset lars-recipes       # both LARS recipes against momentum SGD
    python -m train.study --preset fashion            # Fashion-MNIST (make fashion installs it), ≈ 1 h on 2 cores
    python -m train.study --preset state-formats      # LARS/LAMB with fp32, bf16 and int8 optimizer state
    python -m train.study --preset imagenet --data /path/to/imagenet   # prints the torchrun plan
    torchrun --nproc_per_node=8 -m train.study --preset imagenet --data /path/to/imagenet  # runs it

Every (optimizer, batch, LR) trains once per seed; the LR grid of each (optimizer, batch) is extended
while its best mean top-1 lies at an edge. Finished runs are cached under OUT/cache/<config hash>.json;
a second invocation (or one after a kill) trains only what is missing, then rewrites the report from
all records.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train import tensorboard
from train.study import formats, formats_report, sweep
from train.study.cache import ResultCache, write_json_atomic
from train.study.presets import LARS_RECIPES, PRESETS, Preset, lars_recipe_of, with_lars_recipe
from train.study.progress import SweepBar
from train.study.report import analyse, headline, machine, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's command line."""
    p = argparse.ArgumentParser(prog="python -m train.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="which sweep (default: %(default)s)")
    p.add_argument("--out", type=Path, help="study folder: cache/, runs/, report (default: runs/study-<preset>)")
    p.add_argument("--report-dir", type=Path, help="write the report here instead of OUT")
    p.add_argument("--data", help="dataset (ImageFolder root with train/ and val/, or 'default'); overrides the preset")
    p.add_argument("--device", help="trainer device (cpu, cuda, auto); overrides the preset")
    p.add_argument("--epochs", type=float, help="epoch budget; overrides the preset")
    p.add_argument("--optimizers", help="comma-separated subset of the preset's optimizers")
    p.add_argument("--batches", help="comma-separated subset of global batch sizes")
    p.add_argument("--device-batch", type=int,
                   help="images per micro-batch: larger global batches accumulate gradients and BatchNorm "
                        "normalises over this fixed micro-batch (default: the preset's; none: the whole batch)")
    p.add_argument("--seeds", type=int, help="seeds per (optimizer, batch, LR): 0 … N−1 (default: the preset's)")
    p.add_argument("--lars-recipe", choices=LARS_RECIPES,
                   help="LARS LR and warmup rule of the preset's 'lars' (default: the preset's)")
    p.add_argument("--max-lr-extensions", type=int,
                   help="LR factors tried beyond the initial grid per (optimizer, batch) (default: the preset's)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="accuracy 'holds' while its drop from the peak is surely below this top-1 fraction "
                        "(default: %(default)s; the state-formats preset's margin is fixed at 1 point)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="two-sided confidence of every interval and decision (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="TensorBoard event files of each run trained, in DIR/<run key> (default: OUT/tensorboard "
                        "when the tensorboard package is installed)")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    p.add_argument("--jobs", type=int,
                   help="runs trained at once on a CPU device, each with cpu_count/jobs threads "
                        "(default: one per core on CPU, 1 on a GPU or under torchrun)")
    p.add_argument("--plan", action="store_true", help="print the runs (and their torchrun commands) and exit")
    p.add_argument("--nproc-per-node", type=int, default=8, help="GPUs per node in printed torchrun commands")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in printed torchrun commands")
    args = p.parse_args(argv)
    if args.tolerance < 0:
        p.error(f"--tolerance must be non-negative, got {args.tolerance}")
    if args.epochs is not None and not args.epochs > 0:
        p.error(f"--epochs must be positive, got {args.epochs}")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.device_batch is not None and args.device_batch < 1:
        p.error(f"--device-batch must be at least 1, got {args.device_batch}")
    if args.seeds is not None and args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.max_lr_extensions is not None and args.max_lr_extensions < 0:
        p.error(f"--max-lr-extensions must be ≥ 0, got {args.max_lr_extensions}")
    if not 0 < args.confidence < 1:
        p.error(f"--confidence must lie in (0, 1), got {args.confidence}")
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _csv(text: str | None, kind: type, name: str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise SystemExit(f"--{name}: expected comma-separated {kind.__name__} values, got {text!r}") from exc


def cli_command(config: dict[str, Any], launcher: str, config_cls: type) -> str:
    """`launcher -m train` with one flag per non-default trainer field (bools as bare flags)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    parts = ["-m", "train"]
    for name, value in config.items():
        if value is None or value == defaults.get(name) or name in ("quiet",):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            parts += [flag, f"{value:.6g}" if isinstance(value, float) else str(value)]
    return " ".join([launcher, *(shlex.quote(p) for p in parts)])


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def print_plan(runs: list[sweep.PlannedRun], preset: Preset, args: argparse.Namespace, out: Path,
               engine: sweep.Engine) -> None:
    """The runs and, for multi-GPU presets, the torchrun commands that execute them."""
    launcher = (f"torchrun --nnodes={args.nnodes} --nproc_per_node={args.nproc_per_node}"
                + (" --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500" if args.nnodes > 1 else ""))
    data = args.data or preset.train.get("data", "/path/to/imagenet")
    print(f"# preset {preset.name}: {len(runs)} runs to start with, then up to {preset.max_lr_extensions} more LR "
          f"factors per (optimizer, batch) × {len(preset.seeds)} seeds — {preset.description}")
    print(f"# the whole study, cached and resumable (rank 0 writes {out}):")
    print(f"{launcher} -m train.study --preset {preset.name} --data {shlex.quote(str(data))} --out {out}")
    print("# or run by run with the trainer:")
    for run in runs:
        print(f"# {run.describe()}")
        print(cli_command({**run.config, "out": str(out / "runs" / run.key)}, launcher, engine.config_cls))


def main(argv: list[str] | None = None) -> int:
    """Plan, train what the cache lacks, and write the report; returns the exit status."""
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.epochs is not None:
        preset = dataclasses.replace(preset, epochs=args.epochs)
    if args.device_batch is not None:
        preset = dataclasses.replace(preset, device_batch=args.device_batch)
    if args.seeds is not None:
        preset = dataclasses.replace(preset, seeds=tuple(range(args.seeds)))
    if args.max_lr_extensions is not None:
        preset = dataclasses.replace(preset, max_lr_extensions=args.max_lr_extensions)
    if args.lars_recipe is not None:
        try:
            preset = with_lars_recipe(preset, args.lars_recipe)
        except KeyError as exc:
            raise SystemExit(f"--lars-recipe: {exc.args[0]}") from exc
    out = args.out or Path("runs") / f"study-{preset.name}"
    overrides: dict[str, Any] = {}
    if args.data is not None:
        overrides["data"] = args.data
    if args.device is not None:
        overrides["device"] = args.device
    data = overrides.get("data", preset.train.get("data"))
    rank, world = _rank()
    log = print if rank == 0 else (lambda _msg: None)
    engine = sweep.resolve_engine()
    multi_gpu = preset.multi_gpu
    if data is not None and not multi_gpu and data != "default" and not Path(data).expanduser().exists():
        raise SystemExit(f"--data {data} does not exist; for the fashion preset run `make fashion` (it installs "
                         "Debian's dataset-fashion-mnist, or says which four files to put where) or pass --data FOLDER")
    if preset.train_size is not None:
        train_size = preset.train_size
    elif data is None:
        raise SystemExit(f"preset {preset.name} needs --data")
    else:
        train_size = engine.train_size(data)
    try:
        runs = sweep.plan_runs(preset, train_size, overrides, _csv(args.optimizers, str, "optimizers"),
                               _csv(args.batches, int, "batches"), engine.name)
    except (KeyError, ValueError) as exc:
        raise SystemExit(f"python -m train.study: {exc.args[0] if exc.args else exc}") from exc
    if args.plan or (multi_gpu and world == 1):
        if multi_gpu and not args.plan:
            print(f"# preset {preset.name} is for multi-GPU torchrun; printing its plan instead of running it.")
        if multi_gpu and data is None:
            print("# pass --data /path/to/imagenet (ImageFolder with train/ and val/) when launching")
        print_plan(runs, preset, args, out, engine)
        return 0
    cache = ResultCache(out / "cache")
    started = time.time()
    device = overrides.get("device", preset.train.get("device", "cpu"))
    on_cpu = device == "cpu" or (device == "auto" and not _cuda_available())
    jobs = args.jobs or ((os.cpu_count() or 1) if on_cpu and world == 1 else 1)
    log(f"study {preset.name}: {len(runs)} runs to start with ({len(preset.seeds)} seeds), training set "
        f"{train_size} images, {jobs} at a time, out {out}")
    board = _tensorboard(args, out, log)
    bar = SweepBar(preset.name, enabled=rank == 0 and not args.no_progress)
    try:
        outcome = sweep.execute(runs, cache, out / "runs", engine,
                                follow_up=sweep.lr_search(preset, train_size, overrides, engine.name),
                                progress=bar, write=rank == 0, jobs=jobs, tensorboard=board)
    finally:
        bar.close()
    if rank != 0:
        return 0
    meta = {
        "preset": preset.name, "runs": len(outcome.records), "initial_runs": len(runs),
        "executed": outcome.executed, "cached": outcome.cached, "seeds": list(preset.seeds),
        "lars_recipe": _lars_recipe(preset), "jobs": jobs,
        "machine": machine(), "engine": engine.name, "train_size": train_size,
        "wall_time_s": round(time.time() - started, 1),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "train.study", *(argv or sys.argv[1:])]),
    }
    write_json_atomic((args.report_dir or out) / "study.json", meta)  # beside the report it describes
    if preset.compares_states:
        report = formats_report.write_report(outcome.records, preset, args.report_dir or out, meta,
                                             confidence=args.confidence)
        log(formats_report.headline(formats.compare(outcome.records, confidence=args.confidence)))
        log(f"trained {outcome.executed}, cached {outcome.cached}, {meta['wall_time_s']:.0f} s; report: {report}")
        return 0
    cells, found = analyse(outcome.records, preset, args.tolerance, args.confidence)
    report = write_report(outcome.records, cells, found, preset, args.report_dir or out, args.tolerance, meta,
                          args.confidence)
    log(headline(cells, found, preset, args.confidence))
    log(f"trained {outcome.executed}, cached {outcome.cached}, {meta['wall_time_s']:.0f} s; report: {report}")
    return 0


def _tensorboard(args: argparse.Namespace, out: Path, log: Callable[[str], Any]) -> Path | None:
    """The folder of the runs' TensorBoard logs (one sub-folder per run key), or None."""
    if args.no_tensorboard:
        return None
    if not tensorboard.installed():
        if args.tensorboard is not None:
            raise SystemExit(f"--tensorboard {args.tensorboard}: the tensorboard package is not installed "
                             "(pip install tensorboard), or pass --no-tensorboard")
        log(tensorboard.NOT_INSTALLED)
        return None
    return args.tensorboard or out / "tensorboard"


def _lars_recipe(preset: Preset) -> str | None:
    """Which LARS recipe the preset's "lars" follows (None: no such contestant)."""
    labels = [o.label for o in preset.optimizers]
    return lars_recipe_of(preset.optimizer("lars")) if "lars" in labels else None


if __name__ == "__main__":
    sys.exit(main())
