"""The training loop: accumulation, AMP, DDP / ZeRO / FSDP2, evaluation, metrics, exact resume.

One optimizer update t (1-based, of T) takes A = global_batch / (device_batch · world_size) micro-
batches per process. Each micro-batch's loss is divided by A, gradients are synchronised only on the
last micro-batch (DDP no_sync / FSDP2 requires_gradient_sync), so the update uses the mean gradient
over the whole global batch; the LR schedule counts updates. The data order and augmentation are pure
functions of (seed, epoch, update, micro-batch), so a run resumed from a checkpoint continues the exact
trajectory of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from train import checkpoint, launch, tensorboard
from train.config import TrainConfig, accumulation_steps
from train.metrics import JsonlLog, NoiseScale, Stopwatch, TrustRatios, WeightDiffusion, squared_norm
from train.models import build_model, resolve_model_name
from train.optimizers import build_optimizer
from train.schedule import Schedule, total_updates

# Config fields that may differ between a run and its resumption; every other field defines the trajectory.
RESUME_FREE_FIELDS = {"out", "resume", "quiet", "workers", "checkpoint_every", "eval_every", "backend", "loader",
                      "tensorboard"}
LOG_POINTS = 60


@dataclass
class RunResult:
    """What one run produced. `optimizer_share` = time in optimizer.step() / time of whole updates
    (data, forward, backward, step); `history` holds the logged records (step, epoch, lr, loss,
    w_dist, b_simple, optimizer_share, images_per_s, top1, top5, and for LARS/LAMB trust_ratios:
    {parameter name: ratio} of the adapting parameters)."""

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
    data_time_share: float = 0.0
    world_size: int = 1
    accumulation_steps: int = 1
    b_simple: float | None = None
    final_w_dist: float | None = None


@dataclass
class _Progress:
    """The part of a run's state that is not in the model or optimizer."""

    t: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_to_target: int | None = None
    images: int = 0
    train_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    update_seconds: float = 0.0
    data_seconds: float = 0.0


def train(cfg: TrainConfig) -> RunResult:
    """Run `cfg` to completion (or resume it) and return its RunResult; under torchrun every rank calls
    this and gets the same result."""
    cfg.check()
    topo, created = launch.init(cfg.device)
    try:
        result = _Run(cfg, topo).run()
        if created:
            # FSDP2's parameter groups hold the process group inside reference cycles; freed only by a
            # later collection, the group would be destroyed at an arbitrary point after
            # destroy_process_group, up to interpreter shutdown, where gloo's teardown can abort the
            # process ("terminate called without an active exception"). Free them while the group lives.
            gc.collect()
            dist.barrier()  # no rank tears the group down while another still has collectives in flight
        return result
    finally:
        if created:
            dist.destroy_process_group()


class _Run:
    def __init__(self, cfg: TrainConfig, topo: launch.Topology) -> None:
        from train.data import (
            LoaderConfig,
            build_loaders,
            default_image_size,
            is_default_data,
            native_image_size,
            resolve_data,
        )

        self.cfg, self.topo, self.device = cfg, topo, topo.device
        if cfg.shard != "none" and not topo.distributed:
            raise ValueError(f"--shard {cfg.shard} needs several processes (launch with torchrun)")
        device_batch = cfg.device_batch or cfg.global_batch // topo.world_size
        self.accumulation = accumulation_steps(cfg.global_batch, device_batch, topo.world_size)
        self.device_batch = device_batch
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        root = None if cfg.loader == "synthetic" else resolve_data(cfg.data)
        image_size = cfg.image_size or default_image_size(cfg.data)
        if cfg.image_size is None and root is not None and not is_default_data(cfg.data):
            native = native_image_size(root)
            if native is not None and native < image_size:
                if topo.is_main and not cfg.quiet:
                    print(f"--image-size not given: the training images are {native} px on their shorter side, "
                          f"smaller than the default crop {image_size}; cropping at {native} (pass --image-size "
                          "to choose)")
                image_size = native
        self.train_data, self.eval_data = build_loaders(LoaderConfig(
            root=root, loader=cfg.loader, device=self.device, device_batch=device_batch, image_size=image_size,
            rank=topo.rank, world_size=topo.world_size, seed=cfg.seed, workers=cfg.workers,
            channels_last=cfg.channels_last, dtype=self.amp_dtype or torch.float32,
            flip=not is_default_data(cfg.data),  # a mirrored digit is another digit (or none)
            train_subset=cfg.train_subset))
        if cfg.global_batch > self.train_data.num_samples and cfg.loader != "synthetic":
            raise ValueError(f"--global-batch {cfg.global_batch} exceeds the training set "
                             f"({self.train_data.num_samples} images)")
        self.updates_per_epoch = self.train_data.updates_per_epoch(cfg.global_batch)
        self.total = total_updates(cfg.epochs, self.updates_per_epoch, cfg.max_steps)
        self.schedule = Schedule(
            cfg.peak_lr(), self.total, round(cfg.warmup_epochs * self.updates_per_epoch), cfg.decay,
            cfg.poly_power, tuple(round(e * self.updates_per_epoch) for e in cfg.decay_epochs))

        torch.manual_seed(cfg.seed)
        model = build_model(resolve_model_name(cfg.model, cfg.data), self.train_data.num_classes).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.raw_model = model
        self.model = self._wrap(model)
        self.optimizer = build_optimizer(cfg, self.raw_model, self.schedule(1), zero=cfg.shard == "zero")
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.diffusion = WeightDiffusion(self.raw_model) if cfg.track_diffusion else None
        self.noise = NoiseScale() if cfg.noise_scale and cfg.shard != "fsdp2" else None
        self.noise_every = max(1, self.total // 200)
        self.log_steps = {round(s) for s in torch.logspace(0, math.log10(self.total), LOG_POINTS).tolist()}
        self.log_steps.add(self.total)
        self.out = Path(cfg.out)
        self.progress = _Progress()
        if topo.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_log = JsonlLog(self.out / "metrics.jsonl" if topo.is_main else None)
        self.trust_ratios = TrustRatios(self.optimizer, self.raw_model)
        self.board_dir = tensorboard.resolve(cfg.tensorboard, self.out) if topo.is_main else None
        self.board: tensorboard.TensorBoardView | None = None

    # ----------------------------------------------------------------------------------- setup
    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.topo.distributed:
            return model
        if self.cfg.shard == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for child in model.children():
                if any(p.requires_grad for p in child.parameters()):
                    fully_shard(child)
            return fully_shard(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _log(self, message: str) -> None:
        if self.topo.is_main and not self.cfg.quiet:
            print(message, flush=True)

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _optimizer_state(self) -> dict[str, Any] | None:
        if self.cfg.shard == "zero":
            self.optimizer.consolidate_state_dict(to=0)
            return self.optimizer.state_dict() if self.topo.is_main else None
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> None:
        """checkpoint.pt (rank 0). Under FSDP2 every rank first writes its shard (its slices of the params
        and optimizer state, its buffers and RNG states) and checkpoint.pt then names that update's shards."""
        sharded = self.cfg.shard == "fsdp2"
        if sharded:
            checkpoint.save_atomic({
                "model": checkpoint.local_model_state(self.raw_model),
                "optimizer": checkpoint.local_optimizer_state(self.optimizer.state_dict()),
                "rng": checkpoint.rng_states(),
            }, checkpoint.shard_path(self.out, self.progress.t, self.topo.rank))
            dist.barrier()
        optimizer_state = None if sharded else self._optimizer_state()
        if not self.topo.is_main:
            return
        checkpoint.save_atomic({
            "config": self.cfg.as_dict(),
            "progress": vars(self.progress),
            "model": None if sharded else self.raw_model.state_dict(),
            "optimizer": optimizer_state,
            "shards": {"update": self.progress.t, "world_size": self.topo.world_size} if sharded else None,
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "noise": None if self.noise is None else self.noise.state_dict(),
            "rng": checkpoint.rng_states(),
        }, self.checkpoint_path)
        if sharded:
            checkpoint.remove_shards_before(self.out, self.progress.t)

    def maybe_resume(self) -> None:
        if not self.cfg.resume:
            return
        if not self.checkpoint_path.is_file():
            self._log(f"--resume: no checkpoint at {self.checkpoint_path} yet; starting from step 0")
            return
        state = checkpoint.load(self.checkpoint_path)
        # a field a checkpoint predates was at its default then (e.g. optim_state: fp32)
        saved = {**TrainConfig().as_dict(), **state["config"]}
        differing = sorted(k for k, v in self.cfg.as_dict().items()
                           if k not in RESUME_FREE_FIELDS and _jsonable(saved.get(k)) != _jsonable(v))
        if differing:
            raise ValueError(f"--resume: {self.checkpoint_path} was written by a run with different "
                             f"{', '.join(differing)}; resume with the same settings or a new --out")
        rng = state["rng"]
        if self.cfg.shard == "fsdp2":
            rng = self._load_shard(state["shards"])
        else:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.noise is not None and state["noise"] is not None:
            self.noise.load_state_dict(state["noise"])
        checkpoint.restore_rng_states(rng)
        self.progress = _Progress(**state["progress"])
        if self.progress.t % self.updates_per_epoch and not self.train_data.resumes_mid_epoch:
            raise ValueError(f"--resume: the {self.cfg.loader} loader resumes only at epoch boundaries, and "
                             f"{self.checkpoint_path} is at update {self.progress.t} inside an epoch")
        self.metrics_log.rewrite(self.progress.history)
        self._log(f"resumed from {self.checkpoint_path} at update {self.progress.t} of {self.total}")

    def _load_shard(self, shards: dict[str, int]) -> dict[str, Any]:
        """This rank's slices of the params and optimizer state from the shard checkpoint.pt names; returns
        the rank's RNG states."""
        if shards["world_size"] != self.topo.world_size:
            raise ValueError(f"--resume: {self.checkpoint_path} was written by {shards['world_size']} FSDP2 "
                             f"processes, this run has {self.topo.world_size}; resume with as many")
        shard = checkpoint.load(checkpoint.shard_path(self.out, shards["update"], self.topo.rank))
        checkpoint.load_local_model_state(self.raw_model, shard["model"])
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.load_state_dict(checkpoint.sharded_optimizer_state(shard["optimizer"], params))
        return shard["rng"]

    # ------------------------------------------------------------------------------------ steps
    def _micro_step(self, images: Tensor, labels: Tensor, sync: bool) -> Tensor:
        if sync or not self.topo.distributed:
            context: Any = contextlib.nullcontext()
        elif self.cfg.shard == "fsdp2":
            context = contextlib.nullcontext()
        else:
            context = self.model.no_sync()
        if self.cfg.shard == "fsdp2":
            self.model.set_requires_gradient_sync(sync)
        with context:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
            scaled = loss / self.accumulation
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def _grad_sq(self) -> float:
        """|∇L|² of the stored gradients, unscaled (GradScaler) and averaged over the accumulation."""
        value = squared_norm(p.grad for p in self.raw_model.parameters())
        scale = 1.0 if self.scaler is None else float(self.scaler.get_scale())
        return value / scale ** 2

    def _half_batch_grad_sq(self, images: Tensor, labels: Tensor) -> float:
        """|∇L|² on the first half of a micro-batch, without touching weights, stored gradients or BN
        running statistics (the module is called unwrapped, so no gradient synchronisation fires)."""
        half = images.shape[0] // 2
        norms = [m for m in self.raw_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            params = [p for p in self.raw_model.parameters() if p.requires_grad]
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.raw_model(images[:half])
            loss = F.cross_entropy(logits.float(), labels[:half], label_smoothing=self.cfg.label_smoothing)
            grads = torch.autograd.grad(loss, params)
        finally:
            for m, momentum in zip(norms, saved):
                m.momentum = momentum
        return squared_norm(grads)

    def _update(self, batches: Iterator[tuple[Tensor, Tensor]], t: int, watches: dict[str, Stopwatch]) -> Tensor:
        lr = self.schedule(t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        measure_noise = self.noise is not None and t % self.noise_every == 0
        g2_small = b_small = None
        losses = []
        for a in range(self.accumulation):
            watches["data"].start()
            images, labels = next(batches)
            watches["data"].stop()
            last = a == self.accumulation - 1
            losses.append(self._micro_step(images, labels, sync=last))
            if measure_noise and a == 0 and self.accumulation > 1:
                g2_small, b_small = self._grad_sq() * self.accumulation ** 2, images.shape[0]
            elif measure_noise and self.accumulation == 1 and images.shape[0] >= 4:
                g2_small, b_small = self._half_batch_grad_sq(images, labels), images.shape[0] // 2
        if g2_small is not None and b_small is not None:
            self.noise.update(g2_small, b_small, self._grad_sq(), self.cfg.global_batch)
        watches["optimizer"].start()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        watches["optimizer"].stop()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Top-1 and top-5 accuracy over the whole validation set (each rank its shard, summed)."""
        module = self.model if self.cfg.shard == "fsdp2" else self.raw_model
        module.eval()
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        batches = iter(self.eval_data.batches())
        previous = None
        while True:
            batch = next(batches, None)
            if self.cfg.shard == "fsdp2":  # every rank must run the same number of sharded forwards
                more = torch.tensor(float(batch is not None), device=self.device)
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
                if not more.item():
                    break
                if batch is None:
                    with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                        module(previous[0])
                    continue
            elif batch is None:
                break
            images, labels = previous = batch
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = module(images)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts += torch.stack([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(dim=1).sum(),
                                   torch.tensor(labels.numel(), device=self.device)]).double()
        module.train()
        if self.topo.distributed:
            dist.all_reduce(counts)
        correct1, correct5, seen = counts.tolist()
        return correct1 / max(seen, 1), correct5 / max(seen, 1)

    # ------------------------------------------------------------------------------------- loop
    def _record(self, t: int, loss: Tensor, evaluate: bool, watches: dict[str, Stopwatch]) -> None:
        p = self.progress
        update_seconds = p.update_seconds + watches["update"].seconds
        optimizer_seconds = p.optimizer_seconds + watches["optimizer"].seconds
        entry: dict[str, Any] = {"step": t, "epoch": t / self.updates_per_epoch, "lr": self.schedule(t),
                                 "loss": float(loss), "b_simple": None if self.noise is None else self.noise.value,
                                 "optimizer_share": optimizer_seconds / update_seconds if update_seconds else None,
                                 "images_per_s": p.images / update_seconds if update_seconds else None,
                                 "top1": None, "top5": None}
        if self.diffusion is not None:
            entry["w_dist"] = self.diffusion.distance(self.raw_model)
        if self.trust_ratios.enabled:
            entry["trust_ratios"] = self.trust_ratios.values()
        if evaluate:
            entry["top1"], entry["top5"] = self.evaluate()
            target = self.cfg.target_accuracy
            if p.steps_to_target is None and target is not None and entry["top1"] >= target:
                p.steps_to_target = t
        p.history.append(entry)
        self.metrics_log.write(entry)
        if self.board is not None:
            self.board.write(entry)

    def run(self) -> RunResult:
        self.maybe_resume()
        if self.board_dir is not None:  # a resumed view drops what a killed run logged after its checkpoint
            self.board = tensorboard.TensorBoardView(self.board_dir, purge_step=self.progress.t + 1)
            if not self.progress.t:
                self.board.write_config(self.cfg.as_dict())
        elif self.cfg.tensorboard == "auto":
            self._log(tensorboard.NOT_INSTALLED)
        try:
            return self._run()
        finally:
            if self.board is not None:
                self.board.close()

    def _run(self) -> RunResult:
        p, cfg = self.progress, self.cfg
        if self.topo.is_main:
            (self.out / "config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")
        self._log(f"{cfg.optimizer} on {cfg.data}: global batch {cfg.global_batch} = {self.device_batch} × "
                  f"{self.topo.world_size} processes × {self.accumulation} accumulation steps, {self.total} updates, "
                  f"peak lr {cfg.peak_lr():.4g}, device {self.device}")
        watches = {name: Stopwatch(self.device) for name in ("data", "optimizer", "update")}
        bar = None
        if self.topo.is_main and not cfg.quiet:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=p.t, unit="step", dynamic_ncols=True)
        start = time.perf_counter()
        eval_seconds = 0.0
        pending_checkpoint = False
        while p.t < self.total:
            epoch, first_update = divmod(p.t, self.updates_per_epoch)
            batches = iter(self.train_data.epoch(epoch, cfg.global_batch, start_update=first_update))
            for _ in range(first_update, self.updates_per_epoch):
                if p.t >= self.total:
                    break
                t = p.t + 1
                watches["update"].start()
                loss = self._update(batches, t, watches)
                watches["update"].stop()
                p.t, p.images = t, p.images + cfg.global_batch
                epoch_end = t % self.updates_per_epoch == 0
                evaluate = epoch_end or t == self.total or bool(cfg.eval_every and t % cfg.eval_every == 0)
                if evaluate or t in self.log_steps:
                    eval_start = time.perf_counter()
                    self._record(t, loss, evaluate, watches)
                    eval_seconds += time.perf_counter() - eval_start
                if bar is not None:
                    bar.update(1)
                    if evaluate or t % 10 == 0:
                        elapsed = time.perf_counter() - start - eval_seconds
                        bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{self.schedule(t):.3g}",
                                        img_s=f"{p.images / max(p.train_seconds + elapsed, 1e-9):.0f}")
                pending_checkpoint |= bool(cfg.checkpoint_every and t % cfg.checkpoint_every == 0)
                if pending_checkpoint and (epoch_end or self.train_data.resumes_mid_epoch) and t < self.total:
                    self._bank_time(watches, start, eval_seconds)
                    start, eval_seconds = time.perf_counter(), 0.0
                    self.save_checkpoint()
                    pending_checkpoint = False
        self._bank_time(watches, start, eval_seconds)
        if bar is not None:
            bar.close()
        if cfg.checkpoint_every or cfg.resume:
            self.save_checkpoint()
        return self._result()

    def _bank_time(self, watches: dict[str, Stopwatch], start: float, eval_seconds: float) -> None:
        p = self.progress
        p.train_seconds += time.perf_counter() - start - eval_seconds
        for name, attribute in (("data", "data_seconds"), ("optimizer", "optimizer_seconds"),
                                ("update", "update_seconds")):
            setattr(p, attribute, getattr(p, attribute) + watches[name].seconds)
            watches[name].total = 0.0

    def _result(self) -> RunResult:
        p = self.progress
        last_eval = next((h for h in reversed(p.history) if h["top1"] is not None), None)
        top1, top5 = (last_eval["top1"], last_eval["top5"]) if last_eval else self.evaluate()
        result = RunResult(
            top1=top1, top5=top5, steps=p.t, epochs=p.t / self.updates_per_epoch, wall_time_s=p.train_seconds,
            images_per_s=p.images / p.train_seconds if p.train_seconds else 0.0,
            optimizer_share=p.optimizer_seconds / p.update_seconds if p.update_seconds else 0.0,
            steps_to_target=p.steps_to_target, history=p.history, config=self.cfg.as_dict(),
            data_time_share=p.data_seconds / p.update_seconds if p.update_seconds else 0.0,
            world_size=self.topo.world_size, accumulation_steps=self.accumulation,
            b_simple=None if self.noise is None else self.noise.value,
            final_w_dist=None if self.diffusion is None else self.diffusion.distance(self.raw_model))
        if self.topo.is_main:
            final = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                     for k, v in self.model.state_dict().items()} if self.cfg.shard == "fsdp2" else None
            torch.save(final if final is not None else self.raw_model.state_dict(), self.out / "final_model.pt")
            summary = {k: v for k, v in vars(result).items() if k != "history"}
            (self.out / "result.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        elif self.cfg.shard == "fsdp2":
            for v in self.model.state_dict().values():
                if hasattr(v, "full_tensor"):
                    v.full_tensor()
        return result


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
