"""Where the native CPU LARS step's time goes, pass by pass, against torch's fused SGD(momentum).

    python -m benchmarks.lars_passes [--params bert_base] [--rounds 21] [--json PATH]

Without a GradScaler the step is three passes (csrc/cpu/ops.cpp): the gradient norms over every
tensor (their non-finite check decides the skip before anything is written: reads g, 4 B/element),
then per group of tensors ||w|| (4 B, from memory or, for a group that stays cached until its update,
partly from cache) and the update (reads w, v, g and writes w, v: 20 B, as fused SGD). Timed here, all
on ONE set of tensors (on a VM the placement of a second copy alone moves a step by ~10%), in
interleaved rounds with the order rotated each round (medians):

* ``grad_norms``: the gradient pass alone (the grad_norms op);
* ``given_norms``: lars_step_ given ||g||: the ||w|| passes and the updates;
* ``update_only``: lars_step_ with adapt=False: the update pass alone (no norms);
* ``step``: LARS.step() on the cached host path: the gradient pass, the skip flag and the updates, with
  each tensor's ||w|| carried from the previous update (LARS.reuse_weight_norms), so no ||w|| pass;
* ``fused_sgd``: torch.optim.SGD(momentum, fused=True) over a copy of the tensors;
* ``stream_read`` / ``stream_update2``: fastlars._C.stream_pass over as many elements (a read-only sum,
  and two in-place arrays fed by a third: SGD's mix), the roofline probes of benchmarks.measure.

Derived: the ||w|| passes' net cost = given_norms − update_only (a full read = stream_read), and each
figure over fused SGD's. On a machine whose reads are bandwidth-bound whatever the mix (writes ride on
top), a step that must read g before any write reads ≥ 16 B/element against SGD's 12: its floor is
about 1 + grad_norms / fused_sgd × SGD's time, whatever the kernels do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import time_rounds

CASES = ("grad_norms", "given_norms", "update_only", "step", "fused_sgd", "stream_read", "stream_update2")


def _cases(set_name: str) -> dict[str, Callable[[], Any]]:
    import fastlars
    from benchmarks.params import PARAM_SETS, make_params
    from fastlars._extension import extension

    ext = extension()
    if ext is None or not hasattr(ext, "stream_pass"):
        raise RuntimeError("the compiled extension (fastlars._C) is not built")
    ops = torch.ops.fastlars
    params = make_params(PARAM_SETS[set_name].shapes(), torch.float32, "cpu")
    grads = [p.grad for p in params]
    opt = fastlars.LARS(params, lr=1.0, momentum=0.9, weight_decay=5e-5, backend="native")
    opt.step()  # creates the momentum buffers; later steps take the cached host path
    buffers = [opt.state[p]["momentum_buffer"] for p in params]
    norms = ops.grad_norms(grads, None)

    def lars(adapt: bool) -> None:  # LARS.step()'s op call, lr 1, momentum 0.9, decay 5e-5, trust 1e-3
        ops.lars_step_(params, grads, buffers, [], norms, 1.0, None, 0.9, 5e-5, 1e-3, 0.0, False, False, False,
                       adapt, None, False, None, None, None)

    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    sgd = torch.optim.SGD(copies, lr=0.1, momentum=0.9, weight_decay=5e-5, fused=True)
    sgd.step()
    n = sum(p.numel() for p in params)
    x, y, z = torch.ones(n), torch.ones(n), torch.ones(n)
    return {
        "grad_norms": lambda: ops.grad_norms(grads, None),
        "given_norms": lambda: lars(True),
        "update_only": lambda: lars(False),
        "step": opt.step,
        "fused_sgd": sgd.step,
        "stream_read": lambda: ext.stream_pass(x, y, z, mode="read", repeats=1),
        "stream_update2": lambda: ext.stream_pass(x, y, z, mode="update2", repeats=1),
    }


def measure(set_name: str = "bert_base", rounds: int = 21) -> dict[str, Any]:
    """Median ms of each of CASES over `rounds` rotated rounds (after one warm-up call each), the derived
    ratios, and the machine and load (os.getloadavg at start and end)."""
    from fastlars.env import cpu_name

    load_start = os.getloadavg()
    cases = _cases(set_name)
    for fn in cases.values():
        fn()
    timings = dict(zip(CASES, time_rounds([cases[k] for k in CASES], [rounds] * len(CASES), torch.device("cpu"),
                                          rounds)))
    ms = {k: t.median for k, t in timings.items()}
    sgd = ms["fused_sgd"]
    derived = {"w_passes_ms": ms["given_norms"] - ms["update_only"],
               "step_over_sgd": ms["step"] / sgd, "grad_norms_over_sgd": ms["grad_norms"] / sgd,
               "update_only_over_sgd": ms["update_only"] / sgd,
               "w_passes_over_sgd": (ms["given_norms"] - ms["update_only"]) / sgd,
               "w_passes_over_stream_read": (ms["given_norms"] - ms["update_only"]) / ms["stream_read"]}
    return {"params": set_name, "rounds": rounds, "threads": torch.get_num_threads(), "machine": cpu_name(),
            "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "median_ms": ms, "min_ms": {k: t.low for k, t in timings.items()}, "derived": derived}


def report(result: dict[str, Any]) -> str:
    """The result as text: one line per case (median, min, / fused SGD), then the derived figures."""
    sgd = result["median_ms"]["fused_sgd"]
    lines = [f"{result['params']}, {result['machine']} ({result['cpus']} CPUs), {result['threads']} threads, "
             f"{result['rounds']} rotated rounds, load {', '.join(f'{x:.1f}' for x in result['loadavg_start'])} "
             f"-> {', '.join(f'{x:.1f}' for x in result['loadavg_end'])}"]
    for name in CASES:
        med, low = result["median_ms"][name], result["min_ms"][name]
        lines.append(f"  {name:<15} {med:9.3f} ms (min {low:9.3f})  {med / sgd:5.2f}x fused SGD")
    d = result["derived"]
    lines.append(f"  ||w|| passes (given_norms - update_only): {d['w_passes_ms']:.3f} ms = "
                 f"{d['w_passes_over_sgd']:.2f}x fused SGD, {d['w_passes_over_stream_read']:.2f}x a read pass")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lars_passes", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="bert_base", help="a parameter set of benchmarks.params")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    result = measure(args.params, args.rounds)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
