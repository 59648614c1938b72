"""Memory of an optimizer's parameters, gradients and state, measured from the tensors themselves.

    report = fastlars.memory.optimizer_memory(opt)
    print(report.bytes_per_parameter, report.state_bytes_by_key)

Bytes are counted per distinct storage (two views of one buffer count once), so the figures are what
the tensors occupy, not what a formula predicts: an int8 state's block scales, bf16 buffers, fp32
masters and step counters all show up as they are. DTensor parameters and state count their local
shards (what this rank holds).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastlars import distributed
from fastlars.backends.quantization import QuantizedBuffer


@dataclass
class MemoryReport:
    """Bytes held for ``parameters`` elements: params, grads and optimizer state (by state key)."""

    parameters: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    state_bytes_by_key: dict[str, int] = field(default_factory=dict)

    @property
    def state_bytes(self) -> int:
        """All optimizer state: moments, masters, scales, step counters."""
        return sum(self.state_bytes_by_key.values())

    @property
    def total_bytes(self) -> int:
        """Params + grads + state."""
        return self.param_bytes + self.grad_bytes + self.state_bytes

    @property
    def bytes_per_parameter(self) -> float:
        """(params + grads + state) / parameter elements."""
        return self.total_bytes / self.parameters if self.parameters else 0.0

    @property
    def state_bytes_per_parameter(self) -> float:
        """state / parameter elements."""
        return self.state_bytes / self.parameters if self.parameters else 0.0


class _StorageCounter:
    """Adds each distinct storage's bytes once."""

    def __init__(self) -> None:
        self._seen: set[tuple[torch.device, int]] = set()

    def bytes_of(self, t: Tensor) -> int:
        t = distributed.local(t)
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if storage.data_ptr() != 0 and key in self._seen:
            return 0
        self._seen.add(key)
        return storage.nbytes()


def state_memory(params: Iterable[Tensor], states: Iterable[Mapping[str, Any]], include_grads: bool = True
                 ) -> MemoryReport:
    """Measure parameters, their gradients (when ``include_grads``) and one state dict per parameter.

    A state value may be a tensor, a :class:`~fastlars.backends.quantization.QuantizedBuffer` (codes +
    scales), or anything else (ignored: format records, Python numbers).
    """
    counter = _StorageCounter()
    report = MemoryReport()
    for p, state in zip(params, states):
        report.parameters += distributed.local(p).numel()
        report.param_bytes += counter.bytes_of(p)
        if include_grads and p.grad is not None:
            report.grad_bytes += counter.bytes_of(p.grad)
        for key, value in state.items():
            tensors = [value.codes, value.absmax] if isinstance(value, QuantizedBuffer) else [value]
            for t in tensors:
                if isinstance(t, Tensor):
                    report.state_bytes_by_key[key] = report.state_bytes_by_key.get(key, 0) + counter.bytes_of(t)
    return report


def optimizer_memory(optimizer: torch.optim.Optimizer, include_grads: bool = True) -> MemoryReport:
    """:func:`state_memory` of every parameter of ``optimizer`` and its ``optimizer.state``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return state_memory(params, [optimizer.state.get(p, {}) for p in params], include_grads)
