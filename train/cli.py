"""`python -m train`: the command line of the trainer, one flag per TrainConfig field."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from train.config import AMP_MODES, DECAYS, LOADERS, LR_SCALINGS, OPTIM_STATES, OPTIMIZERS, SHARDINGS, TrainConfig
from train.models import MODELS

EXAMPLES = """examples:
  python -m train --data default --epochs 1                       # bundled digits, small CNN, CPU
  python -m train --data /imagenet --loader dali --amp bf16 --channels-last \\
      --optimizer lars --global-batch 32768 --device-batch 256 --epochs 40   # one GPU, 128 accumulation steps
  torchrun --nproc-per-node 8 -m train --data /imagenet --loader dali --amp bf16 --channels-last \\
      --optimizer lamb --global-batch 65536 --device-batch 256 --warmup-epochs 25 --out runs/lamb64k
  torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m train ...

Resume: rerun the same command with --resume; the torch loaders continue mid-epoch at the exact
sample, the DALI loader at the last epoch boundary (DALI's RNG state cannot be saved, so its epochs
are seeded from (seed, epoch, rank) and checkpoints are written only at epoch ends)."""


def parser() -> argparse.ArgumentParser:
    """The argument parser; defaults are TrainConfig's."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m train", description="Large-batch mixed-precision trainer "
                                "(fastlars LARS/LAMB, DDP via torchrun, gradient accumulation, exact resume).",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default=d.data, help="ImageFolder root with train/ and val/, an IDX folder "
                      "(Fashion-MNIST's four files, e.g. /usr/share/datasets/fashion-mnist), or 'default' "
                      "(sklearn digits as 16×16 JPEGs, built once in ~/.cache/fastlars or $FASTLARS_DATA_CACHE)")
    data.add_argument("--loader", default=d.loader, choices=LOADERS,
                      help="dali: NVIDIA DALI GPU decode (pip install nvidia-dali-cuda130); gpu: torchvision nvjpeg "
                           "+ GPU augmentation; cpu: DataLoader workers; synthetic: random tensors")
    data.add_argument("--image-size", type=int, default=d.image_size,
                      help="crop size (default: 224, 16 for digits, the images' own size where that is smaller)")
    data.add_argument("--train-subset", type=int, default=d.train_subset,
                      help="train on a fixed stratified subset of this many training images (IDX datasets)")
    data.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes per rank")
    model = p.add_argument_group("model and precision")
    model.add_argument("--model", default=d.model, choices=("default", *MODELS),
                       help="default: small_cnn on --data default, resnet50 otherwise")
    model.add_argument("--amp", default=d.amp, choices=AMP_MODES, help="autocast dtype; fp16 uses a GradScaler")
    model.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    opt = p.add_argument_group("optimizer")
    opt.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    opt.add_argument("--backend", default=d.backend, help="fastlars backend for lars/lamb (auto, native, triton, "
                     "foreach, reference)")
    opt.add_argument("--optim-state", default=d.optim_state, choices=OPTIM_STATES,
                     help="how lars/lamb store momentum and moments: fp32, bf16, or int8 (blockwise, 256 per fp32 "
                          "scale); biases, norms and small tensors stay fp32; sgd/adamw: fp32 only")
    opt.add_argument("--optim-state-min-size", type=int, default=d.optim_state_min_size, metavar="N",
                     help="tensors with fewer elements keep fp32 state (default: fastlars' 4096)")
    opt.add_argument("--no-skip-nonfinite", dest="skip_nonfinite", action="store_false",
                     help="lars/lamb: apply a step whose gradients hold a NaN/inf instead of skipping it (one read of "
                          "the gradients less per step; under --amp fp16 the GradScaler still skips)")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay,
                     help="default 1e-4 (sgd, lars), 0.01 (lamb, adamw); never on biases and norm layers")
    opt.add_argument("--momentum", type=float, default=d.momentum)
    opt.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd, lars)")
    opt.add_argument("--trust-coefficient", type=float, default=d.trust_coefficient, help="LARS η")
    opt.add_argument("--betas", type=float, nargs=2, default=d.betas, metavar=("B1", "B2"), help="LAMB/AdamW")
    opt.add_argument("--eps", type=float, default=d.eps, help="default 1e-6 (lamb), 1e-8 (adamw)")
    sched = p.add_argument_group("batch and schedule")
    sched.add_argument("--global-batch", type=int, default=d.global_batch, help="images per optimizer update")
    sched.add_argument("--device-batch", type=int, default=d.device_batch,
                       help="images per forward/backward on one device; accumulation steps = global / "
                            "(device × world size), which must divide (default: global / world size)")
    sched.add_argument("--lr", type=float, default=d.lr, help="peak LR after warmup (overrides --base-lr)")
    sched.add_argument("--base-lr", type=float, default=d.base_lr,
                       help="LR at --base-batch, scaled by --lr-scaling (default per optimizer: sgd 0.1, "
                            "lars 0.16, lamb 0.004, adamw 0.001)")
    sched.add_argument("--lr-scaling", default=d.lr_scaling, choices=LR_SCALINGS)
    sched.add_argument("--base-batch", type=int, default=d.base_batch)
    sched.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    sched.add_argument("--decay", default=d.decay, choices=DECAYS)
    sched.add_argument("--poly-power", type=float, default=d.poly_power)
    sched.add_argument("--decay-epochs", type=float, nargs="+", default=d.decay_epochs, help="step-decay milestones")
    sched.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    sched.add_argument("--epochs", type=float, default=d.epochs)
    sched.add_argument("--max-steps", type=int, default=d.max_steps, help="cap on optimizer updates")
    run = p.add_argument_group("run")
    run.add_argument("--shard", default=d.shard, choices=SHARDINGS,
                     help="none: DDP; zero: DDP + ZeroRedundancyOptimizer; fsdp2: fully_shard parameters "
                          "(trust ratios from whole-tensor norms, one all-reduce per step)")
    run.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    run.add_argument("--seed", type=int, default=d.seed, help="seeds the model, data order and augmentation")
    run.add_argument("--out", default=d.out, help="folder for checkpoint.pt, metrics.jsonl, result.json, tensorboard/")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="updates between checkpoints")
    run.add_argument("--eval-every", type=int, default=d.eval_every, help="updates between evaluations "
                     "(0: at epoch ends)")
    run.add_argument("--target-accuracy", type=float, default=d.target_accuracy,
                     help="record the first update whose evaluation reaches this top-1")
    run.add_argument("--no-diffusion", dest="track_diffusion", action="store_false", help="skip ‖w_t − w_0‖")
    run.add_argument("--no-noise-scale", dest="noise_scale", action="store_false", help="skip B_simple")
    run.add_argument("--quiet", action="store_true", help="no progress bar (CI)")
    run.add_argument("--tensorboard", default=d.tensorboard, metavar="DIR",
                     help="write TensorBoard event files (the metrics.jsonl records: loss, LR, top-1/5, ‖w_t − w_0‖, "
                          "B_simple, optimizer share, img/s, per-layer trust ratios) to DIR; default: OUT/tensorboard "
                          "when the tensorboard package is installed")
    run.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const="off",
                     help="no TensorBoard event files")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse argv into a checked TrainConfig (argparse-style exit with the message on a bad value)."""
    p = parser()
    args = vars(p.parse_args(argv))
    args["betas"] = tuple(args["betas"])
    args["decay_epochs"] = tuple(args["decay_epochs"])
    cfg = TrainConfig(**args)
    try:
        cfg.check()
    except ValueError as exc:
        p.error(str(exc))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Train; errors in the inputs exit with status 2 and one line naming the flag."""
    from train.engine import train

    cfg = config_from_args(argv)
    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"python -m train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"top-1 {result.top1:.4f}  top-5 {result.top5:.4f}  {result.steps} updates  "
              f"{result.images_per_s:.0f} images/s  optimizer {100 * result.optimizer_share:.1f}% of step time  "
              f"-> {cfg.out}/result.json")
    return 0
