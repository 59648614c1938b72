"""`python -m benchmarks.state_memory`: bytes per parameter of fastlars.LAMB and fastlars.LARS in each
state format, measured with fastlars.memory from what a real optimizer holds after its first step.

    python -m benchmarks.state_memory                         # ResNet-50 and BERT-base, on the meta device
    python -m benchmarks.state_memory --device cpu --params resnet50 --out benchmarks/results

For each parameter set, algorithm and mode, a module holding the set's parameters (in the mode's dtype,
with zero gradients) is split by ``fastlars.param_groups`` as a user gets it (tensors of < 2 dims:
no decay, no trust ratio, so fp32 state), handed to ``fastlars.LAMB``/``fastlars.LARS`` with the mode's
``state_dtype``, ``master_weights`` and ``stochastic_rounding``, stepped once (the optimizer creates its
state then), and ``fastlars.memory.optimizer_memory`` counts the storages it holds: parameters, gradients,
fp32 masters, moments or int8 codes + block scales, step counters. Nothing is computed from a formula.

The meta device allocates nothing (each storage still has its size) and runs the optimizer's own state
creation and step; tests/test_state_memory_benchmark.py checks that it reports what --device cpu does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastlars
from benchmarks.params import PARAM_SETS, Shape
from benchmarks.suite import machine
from fastlars.memory import MemoryReport, optimizer_memory


@dataclass(frozen=True)
class Mode:
    """How weights and state are kept: parameter dtype, fp32 masters or not, state dtype. bf16 params
    without masters are written by stochastic rounding."""

    label: str
    param_dtype: torch.dtype
    masters: bool
    state_dtype: str

    @property
    def stochastic_rounding(self) -> bool:
        return self.param_dtype == torch.bfloat16 and not self.masters


MODES = [
    Mode("fp32 params, fp32 state", torch.float32, False, "fp32"),
    Mode("bf16 params + fp32 masters, fp32 state", torch.bfloat16, True, "fp32"),
    Mode("bf16 params + fp32 masters, bf16 state", torch.bfloat16, True, "bf16"),
    Mode("bf16 params + fp32 masters, int8 state", torch.bfloat16, True, "int8"),
    Mode("bf16 params (stochastic rounding), bf16 state", torch.bfloat16, False, "bf16"),
    Mode("bf16 params (stochastic rounding), int8 state", torch.bfloat16, False, "int8"),
]

ALGORITHMS = ("lamb", "lars")
WEIGHT_DECAY = {"lamb": 0.01, "lars": 5e-5}


class ShapesModule(nn.Module):
    """A module whose parameters have ``shapes`` (in order), so that fastlars.param_groups splits them."""

    def __init__(self, shapes: Sequence[Shape], dtype: torch.dtype, device: str | torch.device) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)) for shape in shapes)


def build_optimizer(shapes: Sequence[Shape], algorithm: str, mode: Mode, device: str | torch.device
                    ) -> torch.optim.Optimizer:
    """fastlars.LAMB/LARS over ``shapes`` in ``mode``, grouped by fastlars.param_groups, after one step on
    zero gradients (which creates the state)."""
    model = ShapesModule(shapes, mode.param_dtype, device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    groups = fastlars.param_groups(model, WEIGHT_DECAY[algorithm])
    options: dict[str, Any] = dict(master_weights=mode.masters, state_dtype=mode.state_dtype,
                                   stochastic_rounding=mode.stochastic_rounding)
    if algorithm == "lamb":
        opt: torch.optim.Optimizer = fastlars.LAMB(groups, lr=1e-3, **options)
    else:
        opt = fastlars.LARS(groups, lr=1.0, momentum=0.9, **options)
    opt.step()
    return opt


def measure(param_set: str, algorithm: str, mode: Mode, device: str | torch.device = "meta") -> MemoryReport:
    """The memory report of the optimizer of one parameter set, algorithm and mode."""
    return optimizer_memory(build_optimizer(PARAM_SETS[param_set].shapes(), algorithm, mode, device))


def measure_all(param_sets: Sequence[str], device: str | torch.device) -> list[dict[str, Any]]:
    """One JSON-ready record per (mode, parameter set, algorithm)."""
    records = []
    for mode in MODES:
        for s in param_sets:
            for algorithm in ALGORITHMS:
                r = measure(s, algorithm, mode, device)
                records.append({"mode": mode.label, "param_set": s, "algorithm": algorithm,
                                "param_dtype": str(mode.param_dtype).removeprefix("torch."),
                                "master_weights": mode.masters, "state_dtype": mode.state_dtype,
                                "stochastic_rounding": mode.stochastic_rounding, "parameters": r.parameters,
                                "param_bytes": r.param_bytes, "grad_bytes": r.grad_bytes,
                                "state_bytes_by_key": r.state_bytes_by_key,
                                "bytes_per_parameter": r.bytes_per_parameter,
                                "state_bytes_per_parameter": r.state_bytes_per_parameter})
    return records


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """One row per mode: bytes per parameter, total (state alone), per parameter set and algorithm."""
    columns = list(dict.fromkeys((r["param_set"], r["algorithm"]) for r in records))
    header = "| mode | " + " | ".join(f"{s} {a.upper()} total (state)" for s, a in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for label in dict.fromkeys(r["mode"] for r in records):
        by_column = {(r["param_set"], r["algorithm"]): r for r in records if r["mode"] == label}
        cells = [f"{by_column[c]['bytes_per_parameter']:.2f} ({by_column[c]['state_bytes_per_parameter']:.2f})"
                 for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.state_memory", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="resnet50,bert_base", help=f"comma-separated: {', '.join(PARAM_SETS)}")
    p.add_argument("--device", default="meta", help="meta (allocates nothing), cpu or cuda")
    p.add_argument("--out", default=None,
                   help="folder for state_memory_<device>_<date>.json and .md (default: print only)")
    args = p.parse_args(argv)
    sets = [s for s in args.params.split(",") if s]
    unknown = [s for s in sets if s not in PARAM_SETS]
    if unknown or not sets:
        p.error(f"--params: unknown {unknown or args.params!r}; choose from {', '.join(PARAM_SETS)}")
    records = measure_all(sets, args.device)
    host = machine(torch.device("cpu"))
    today = dt.date.today().isoformat()
    text = (f"Bytes per parameter (params + grads + optimizer state; state alone in parentheses) of fastlars.LAMB "
            f"and fastlars.LARS after one step, measured by fastlars.memory.optimizer_memory from the tensors the "
            f"optimizer holds; fastlars.param_groups (biases/norms: fp32 state); device {args.device}; "
            f"{host['device']} ({host['cpus']} CPUs), torch {host['torch']}, commit {host['commit'][:10]}, {today}"
            "\n\n" + markdown(records))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"state_memory_{args.device}_{today}"
        (out / f"{stem}.json").write_text(json.dumps(
            {"device": args.device, "machine": host, "records": records}, indent=2) + "\n")
        (out / f"{stem}.md").write_text(text + "\n")
        print(f"wrote {out / stem}.json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
