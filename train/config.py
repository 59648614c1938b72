"""The trainer's configuration: every field of `python -m train`, its checks, and the batch arithmetic.

Batch arithmetic, defined only here:
    global_batch = device_batch × world_size × accumulation_steps
so the accumulation steps are derived, and a global batch that does not divide is an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastlars.backends.quantization import MIN_QUANTIZED_SIZE

OPTIMIZERS = ("lars", "lamb", "sgd", "adamw")
LOADERS = ("dali", "gpu", "cpu", "synthetic")
LR_SCALINGS = ("linear", "sqrt", "none")
DECAYS = ("poly", "cosine", "step")
AMP_MODES = ("bf16", "fp16", "off")
SHARDINGS = ("none", "zero", "fsdp2")
OPTIM_STATES = ("fp32", "bf16", "int8")
# Base LR per 256 images when neither --lr nor --base-lr is given (ImageNet/ResNet-50 recipes: Goyal et al.
# for SGD; MLPerf LARS, peak 10 at 16K; LAMB and AdamW scaled by √B as in You et al. 2019).
DEFAULT_BASE_LR = {"sgd": 0.1, "lars": 0.16, "lamb": 0.004, "adamw": 0.001}


@dataclass
class TrainConfig:
    """One training run. `lr` is the peak LR after warmup; when it is None it is derived from `base_lr`
    by the scaling rule: lr = base_lr · s(global_batch / base_batch) with s(r) = r, √r or 1.
    Neither given: base_lr = DEFAULT_BASE_LR[optimizer] at base_batch. `image_size` None: 16 for the
    digits, else 224, or the images' own size where that is smaller. `train_subset`: train on a fixed
    stratified subset of that many training images (IDX datasets only; train.data.tensors).
    `weight_decay` None means 1e-4 for SGD/LARS and 0.01 for LAMB/AdamW. `device_batch` None means
    global_batch / world_size (no accumulation). `model` "default" is the
    small CNN for the bundled data and ResNet-50 otherwise. `tensorboard`: a folder for TensorBoard event
    files, "auto" (OUT/tensorboard when the tensorboard package is installed) or "off". `optim_state`:
    how fastlars LARS/LAMB store their moments/momentum ("fp32", "bf16" or blockwise "int8"), for
    adapting tensors of at least `optim_state_min_size` elements (the library's `state_dtype` and
    `min_quantized_size`; default 4096 as there); SGD and AdamW take fp32 only. `skip_nonfinite`: whether
    fastlars LARS/LAMB skip a step whose gradients hold a NaN/inf (the library's default, one read of the
    gradients before any write); False applies every step as it comes, as torch's SGD/AdamW do (the
    library's `skip_nonfinite = False`: one pass less; under --amp fp16 the GradScaler's flag still decides)."""

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
    decay_epochs: tuple[float, ...] = (30.0, 60.0, 80.0)
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
    trust_coefficient: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = None
    backend: str = "auto"
    optim_state: str = "fp32"
    optim_state_min_size: int = MIN_QUANTIZED_SIZE
    skip_nonfinite: bool = True
    shard: str = "none"
    image_size: int | None = None
    train_subset: int | None = None
    track_diffusion: bool = True
    noise_scale: bool = True
    target_accuracy: float | None = None
    device: str = "auto"
    quiet: bool = False
    tensorboard: str = "auto"

    def check(self) -> None:
        """Raise ValueError naming the first bad field (as its command-line flag) and what was wrong."""
        choices = {"optimizer": OPTIMIZERS, "loader": LOADERS, "lr_scaling": LR_SCALINGS, "decay": DECAYS,
                   "amp": AMP_MODES, "shard": SHARDINGS, "optim_state": OPTIM_STATES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = {"global_batch": self.global_batch, "base_batch": self.base_batch, "epochs": self.epochs}
        if self.device_batch is not None:
            positive["device_batch"] = self.device_batch
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        if self.image_size is not None:
            positive["image_size"] = self.image_size
        if self.train_subset is not None:
            positive["train_subset"] = self.train_subset
        if not self.tensorboard:
            raise ValueError("--tensorboard needs a folder (or use --no-tensorboard)")
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{flag(name)} must be positive, got {value}")
        for name in ("lr", "base_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{flag(name)} must be positive, got {value}")
        nonneg = {"warmup_epochs": self.warmup_epochs, "label_smoothing": self.label_smoothing,
                  "workers": self.workers, "checkpoint_every": self.checkpoint_every,
                  "eval_every": self.eval_every, "momentum": self.momentum,
                  "optim_state_min_size": self.optim_state_min_size}
        if self.weight_decay is not None:
            nonneg["weight_decay"] = self.weight_decay
        for name, value in nonneg.items():
            if value < 0:
                raise ValueError(f"{flag(name)} must be ≥ 0, got {value}")
        if self.label_smoothing >= 1:
            raise ValueError(f"--label-smoothing must be < 1, got {self.label_smoothing}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"--betas must lie in [0, 1), got {self.betas}")
        if self.nesterov and self.optimizer not in ("sgd", "lars"):
            raise ValueError(f"--nesterov applies to sgd and lars, not {self.optimizer}")
        if self.optim_state != "fp32" and self.optimizer not in ("lars", "lamb"):
            raise ValueError(f"--optim-state {self.optim_state} applies to the fastlars optimizers (lars, lamb); "
                             f"{self.optimizer} keeps fp32 state: use --optim-state fp32")
        if not self.skip_nonfinite and self.optimizer not in ("lars", "lamb"):
            raise ValueError(f"--no-skip-nonfinite applies to the fastlars optimizers (lars, lamb); {self.optimizer} "
                             "never checks its gradients")
        if self.optim_state != "fp32" and self.shard == "fsdp2":
            raise ValueError(f"--optim-state {self.optim_state} with --shard fsdp2 is not supported (fastlars' "
                             "sharded steps take fp32 state); use --optim-state fp32 or --shard none|zero")
        if self.amp != "off" and self.shard == "fsdp2":
            raise ValueError("--amp with --shard fsdp2 is not supported yet (use FSDP2 mixed-precision policies); "
                             "use --amp off or --shard none|zero")

    def peak_lr(self) -> float:
        """The LR after warmup: `lr` if given, else base_lr scaled from base_batch to global_batch:
        base_lr · s(global_batch / base_batch), s(r) = r (linear), √r (sqrt), 1 (none)."""
        if self.lr is not None:
            return self.lr
        base_lr = DEFAULT_BASE_LR[self.optimizer] if self.base_lr is None else self.base_lr
        ratio = self.global_batch / self.base_batch
        return base_lr * {"linear": ratio, "sqrt": ratio ** 0.5, "none": 1.0}[self.lr_scaling]

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able values."""
        return dataclasses.asdict(self)


def flag(field_name: str) -> str:
    """The command-line flag of a config field: global_batch → --global-batch."""
    return "--" + field_name.replace("_", "-")


def accumulation_steps(global_batch: int, device_batch: int, world_size: int) -> int:
    """global_batch / (device_batch · world_size), or a ValueError saying why it does not divide."""
    per_micro_step = device_batch * world_size
    if global_batch % per_micro_step:
        raise ValueError(
            f"--global-batch {global_batch} is not a multiple of --device-batch × world size = "
            f"{device_batch} × {world_size} = {per_micro_step}; pick a global batch that is, e.g. "
            f"{max(per_micro_step, global_batch // per_micro_step * per_micro_step)}")
    return global_batch // per_micro_step
