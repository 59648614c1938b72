"""`python -m benchmarks.state_memory`: bytes per parameter of LAMB and LARS in each state format,
measured with fastlars.memory from the tensors each format allocates (parameters, gradients, fp32
masters, moments or codes + block scales, step counters) for real models' parameter sets.

    python -m benchmarks.state_memory                         # ResNet-50 and BERT-base, on the meta device
    python -m benchmarks.state_memory --device cpu --params resnet50

The state follows the format's rules (fastlars.backends.quantization.resolve_state_dtype): tensors of
≥ 2 dims with ≥ 4096 elements take the requested state dtype; 1-d tensors (biases, norm gains: no decay,
no adaptation under fastlars.param_groups) and small tensors keep fp32. The default meta device
allocates nothing (storages still have their sizes); --device cpu allocates for real.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks.params import PARAM_SETS
from fastlars.backends import quantization as q
from fastlars.memory import MemoryReport, state_memory


@dataclass(frozen=True)
class Mode:
    """How weights and state are kept: parameter dtype, fp32 masters or not, state dtype."""

    label: str
    param_dtype: torch.dtype
    masters: bool
    state_dtype: str


MODES = [
    Mode("fp32 params, fp32 state", torch.float32, False, "fp32"),
    Mode("bf16 params + fp32 masters, fp32 state", torch.bfloat16, True, "fp32"),
    Mode("bf16 params + fp32 masters, bf16 state", torch.bfloat16, True, "bf16"),
    Mode("bf16 params + fp32 masters, int8 state", torch.bfloat16, True, "int8"),
    Mode("bf16 params (stochastic rounding), bf16 state", torch.bfloat16, False, "bf16"),
    Mode("bf16 params (stochastic rounding), int8 state", torch.bfloat16, False, "int8"),
]

BUFFERS = {"lamb": (("exp_avg", q.SIGNED_MAP), ("exp_avg_sq", q.UNSIGNED_MAP)),
           "lars": (("momentum_buffer", q.SIGNED_MAP),)}


def build_state(shapes: Sequence[tuple[int, ...]], algorithm: str, mode: Mode, device: str
                ) -> tuple[list[torch.Tensor], list[dict]]:
    """Parameters (with gradients in the parameter dtype) and their optimizer state in ``mode``."""
    params, states = [], []
    for shape in shapes:
        p = torch.zeros(shape, dtype=mode.param_dtype, device=device)
        p.grad = torch.zeros_like(p)
        state: dict = {"step": torch.zeros((), dtype=torch.float32, device=device)}
        dtype = q.resolve_state_dtype(mode.state_dtype, p.numel(), adapts=p.dim() > 1)
        for name, code_map in BUFFERS[algorithm]:
            if dtype == "int8":
                state[name] = q.QuantizedBuffer.zeros_like(p, code_map)
            else:
                state[name] = torch.zeros(shape, device=device,
                                          dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        if mode.masters:
            state["master_param"] = torch.zeros(shape, dtype=torch.float32, device=device)
        params.append(p)
        states.append(state)
    return params, states


def measure(param_set: str, algorithm: str, mode: Mode, device: str) -> MemoryReport:
    """The memory report of one parameter set, algorithm and mode."""
    params, states = build_state(PARAM_SETS[param_set].shapes(), algorithm, mode, device)
    return state_memory(params, states)


def markdown(param_sets: Sequence[str], device: str) -> str:
    """One row per mode: bytes per parameter (total and state) per parameter set and algorithm."""
    header = "| mode | " + " | ".join(f"{s} {a.upper()} total (state)" for s in param_sets for a in BUFFERS) + " |"
    lines = [header, "|---|" + "---:|" * (len(param_sets) * len(BUFFERS))]
    for mode in MODES:
        cells = []
        for s in param_sets:
            for algorithm in BUFFERS:
                r = measure(s, algorithm, mode, device)
                cells.append(f"{r.bytes_per_parameter:.2f} ({r.state_bytes_per_parameter:.2f})")
        lines.append(f"| {mode.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.state_memory", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="resnet50,bert_base", help=f"comma-separated: {', '.join(PARAM_SETS)}")
    p.add_argument("--device", default="meta", help="meta (allocates nothing), cpu or cuda")
    args = p.parse_args(argv)
    print("Bytes per parameter (params + grads + optimizer state; state alone in parentheses), measured "
          "from the tensors by fastlars.memory.state_memory")
    print()
    print(markdown([s for s in args.params.split(",") if s], args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
