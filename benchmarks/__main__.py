"""`python -m benchmarks`: one optimizer step of fastlars and its peers on real models' parameter sets.

    python -m benchmarks                                   # CPU: ResNet-50 and BERT-base, LAMB and LARS, fp32,
                                                           # on all threads and on 1 (thread scaling)
    python -m benchmarks --device cuda --params resnet50,bert_large --dtype fp32,bf16+master
    python -m benchmarks --share --share-batches 1,4,16    # optimizer share of a ResNet-50 training step
    python -m benchmarks --params bert_base,resnet50 --state fp32,int8 --peers none
                                                           # low-precision state rows beside fp32
    python -m benchmarks --grad-scaler off,on              # each table also stepped through a GradScaler
    python -m benchmarks --skip-nonfinite on,off           # fastlars rows also without the NaN/inf check

Prints a Markdown table (median step time with min–max, GB/s of compulsory traffic, % of the CPU's
streaming roofline and of the copy bandwidth, CPU/wall time, speed-up over each peer, thread scaling,
host overhead on the small sets) and writes JSON (machine, versions, commit), the Markdown and a PNG
under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

import torch

import fastlars
from benchmarks.cases import PEERS, unavailable_peers
from benchmarks.params import PARAM_SETS
from benchmarks.share import optimizer_share, share_markdown, share_plot
from benchmarks.suite import DTYPES, STATES, machine, markdown, run, thread_counts, write
from benchmarks.targets import evaluate

CPU_SETS = "resnet50,bert_base,small_cnn,resnet50_small"  # the last two: host overhead per step
CUDA_SETS = "resnet50,bert_large"


def _list(value: str, allowed: list[str] | tuple[str, ...], flag: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{flag}: unknown {bad or value!r}; choose from {', '.join(allowed)}")
    return items


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--params", default=None, help=f"comma-separated sets: {', '.join(PARAM_SETS)} "
                   f"(default: {CPU_SETS} on CPU, {CUDA_SETS} on CUDA)")
    p.add_argument("--optim", default="lamb,lars", help="lamb, lars or both (comma-separated)")
    p.add_argument("--dtype", default="fp32", help=f"comma-separated: {', '.join(DTYPES)}")
    p.add_argument("--state", default="fp32", help=f"comma-separated state dtypes of the fastlars rows: "
                   f"{', '.join(STATES)} (bf16/int8 rows: the backends that step such state, e.g. "
                   f"'fastlars.native [int8 state]')")
    p.add_argument("--grad-scaler", default="off",
                   help="off, on or off,on: 'on' times each table again with every case stepped through a "
                   "torch.amp.GradScaler (scaler.step + update; dtype labelled e.g. 'fp32+GradScaler')")
    p.add_argument("--skip-nonfinite", default="on",
                   help="on, off or on,off: 'off' adds each fp32 fastlars row stepped with skip_nonfinite=False "
                   "(no NaN/inf pass over the gradients; labelled '[skip_nonfinite=False]')")
    p.add_argument("--backends", default=None, help="fastlars backends (default: every one usable on the device)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated: {', '.join(PEERS)}, or 'none'")
    p.add_argument("--threads", default=None,
                   help="comma-separated torch.set_num_threads counts, 'all' = the current count (default: "
                   "'all,1' on CPU, for the thread-scaling table; the current count on CUDA)")
    p.add_argument("--repeat", type=int, default=20, help="timed steps per case (after warm-up)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds of timed steps per case at most (slow peers get fewer repeats, never < 5)")
    p.add_argument("--rounds", type=int, default=5,
                   help="the cases of one table are timed side by side in this many interleaved rounds")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON, Markdown and PNG")
    p.add_argument("--share", action="store_true", help="measure the optimizer share of a ResNet-50 training step")
    p.add_argument("--share-batches", default=None, help="per-device batches (default 1,4,16 CPU; 32,64,128,256 GPU)")
    p.add_argument("--image-size", type=int, default=224, help="image side for --share (224: ImageNet)")
    return p


def share(device: torch.device, batches: list[int], backends: list[str], optims: list[str], repeats: int,
          image_size: int, info: dict, out: Path, stem: str) -> int:
    """--share: the optimizer share table per optimizer, JSON and one PNG per optimizer under `out`."""
    rows = optimizer_share(device, batches, backends, optims, repeats, image_size)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "repeats": repeats, "image_size": image_size, "rows": rows}
    (out / f"share_{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = f"Machine: {info['device']}; {repeats} timed repeats, median; images {image_size}²\n\n" + "\n\n".join(
        share_markdown([r for r in rows if r["optim"] == o], o) for o in optims)
    (out / f"share_{stem}.md").write_text(text + "\n")
    for o in optims:
        share_plot([r for r in rows if r["optim"] == o], out / f"share_{o}_{stem}.png",
                   f"ResNet-50 {o.upper()} — {info['device']}")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.repeat < 3:
        p.error("--repeat: at least 3")
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    if args.image_size < 64:
        p.error("--image-size: at least 64 (ResNet-50's last stage needs 2×2 maps for batch 1)")
    usable = fastlars.available_backends(device)
    try:
        sets = _list(args.params or (CPU_SETS if device.type == "cpu" else CUDA_SETS),
                     list(PARAM_SETS), "--params")
        optims = _list(args.optim, ("lamb", "lars"), "--optim")
        dtypes = _list(args.dtype, list(DTYPES), "--dtype")
        states = tuple(_list(args.state, STATES, "--state"))
        scalers = tuple(dict.fromkeys(v == "on" for v in _list(args.grad_scaler, ("off", "on"), "--grad-scaler")))
        checks = tuple(dict.fromkeys(v == "on" for v in _list(args.skip_nonfinite, ("on", "off"), "--skip-nonfinite")))
        backends = _list(args.backends, usable, "--backends") if args.backends else list(usable)
        peers = () if args.peers == "none" else tuple(_list(args.peers, PEERS, "--peers"))
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    try:
        counts = thread_counts(args.threads, device)
    except ValueError as exc:
        p.error(f"--threads: {exc}")
    for name in ("reference", "foreach", "native", "triton"):
        if name not in usable:
            print(f"fastlars.{name}: not measured: {fastlars.backends.unavailable_reason(name, device)}")
    skipped = unavailable_peers(device, peers)
    for peer in peers:
        if peer in skipped:
            print(f"{peer}: not measured: {skipped[peer]}")
    requested, peers = peers, tuple(peer for peer in peers if peer not in skipped)
    info = machine(device)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", info["device"]).strip("_")[:40]
    if device.type == "cpu":
        tag += f"_{info['cpus']}cpu"
    stem = f"{device.type}_{tag}_{dt.date.today().isoformat()}"
    out = Path(args.out)
    if args.share:
        try:
            batches = [int(b) for b in (args.share_batches or ("1,4,16" if device.type == "cpu" else
                                                              "32,64,128,256")).split(",")]
        except ValueError:
            p.error(f"--share-batches: comma-separated integers, not {args.share_batches!r}")
        return share(device, batches, backends, optims, args.repeat, args.image_size, info, out, stem)
    not_measured = {**{f"fastlars.{b}": fastlars.backends.unavailable_reason(b, device)
                       for b in ("reference", "foreach", "native", "triton") if b not in usable},
                    **{p_: r for p_, r in skipped.items() if p_ in requested}}
    result = run(device, sets, optims, dtypes, backends, peers, args.repeat, args.budget, threads=counts, states=states,
                 rounds=args.rounds, grad_scalers=scalers, skip_nonfinite=checks,
                 on_row=lambda partial: write({**partial, "not_measured": not_measured}, out, f"step_{stem}",
                                              with_plot=False))
    result["not_measured"] = not_measured
    result["targets"] = evaluate(result)
    paths = write(result, out, f"step_{stem}")
    print()
    print(markdown(result))
    print("wrote " + ", ".join(str(p_) for p_ in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
