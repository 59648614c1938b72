"""The self-check of ``python -m fastlars``: every usable backend against the reference, here and now.

For each device (the CPU, and CUDA when a GPU is visible), each backend usable there other than the
reference, each algorithm (LARS, LAMB) and each storage dtype (fp32; bf16 and fp16 with fp32 master
weights), the same seeded parameters and gradients go through STEPS optimizer steps on that backend
and on the reference backend of the same device. A case passes when every parameter, every state
tensor and every recorded trust ratio is close to the reference's within the dtype's tolerance,
|a − r| ≤ atol + rtol·|r| (TOLERANCES, those of the test suite). The step time is the shortest wall
time of the steps after the first (which creates the state), synchronised on a GPU, host work included:
one process's snapshot for spotting a backend that is broken or far off, not a benchmark (that is
``python -m benchmarks``).

The parameter set covers what kernels get wrong first: an empty tensor, one element, odd sizes, a
conv kernel, a tensor spanning several chunks, and a group that does not adapt (ratio 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from fastlars import backends
from fastlars.optim import LAMB, LARS

STEPS = 3
SHAPES: tuple[tuple[int, ...], ...] = ((0,), (1,), (7,), (33, 17), (8, 3, 3, 3), (65_537,), (1031,), (16,))
NON_ADAPTING = 2
"""The last NON_ADAPTING shapes form a group without weight decay or trust ratio (biases, norms)."""

DTYPES: dict[str, tuple[torch.dtype, bool]] = {
    "fp32": (torch.float32, False),
    "bf16+master": (torch.bfloat16, True),
    "fp16+master": (torch.float16, True),
}
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # (atol, rtol) by parameter dtype
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 1e-2),
}
ALGORITHMS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "lars": (LARS, {"lr": 2.0, "momentum": 0.9, "weight_decay": 1e-2}),
    "lamb": (LAMB, {"lr": 1e-2, "weight_decay": 1e-2, "max_grad_norm": 1.0}),
}


@dataclass
class CaseResult:
    """One (device, backend, algorithm, dtype) case: how far it is from the reference and how fast."""

    device: str
    backend: str
    algorithm: str
    dtype: str
    max_abs_error: float | None
    atol: float
    rtol: float
    step_ms: float | None
    reference_step_ms: float | None
    ok: bool
    error: str | None = None


def devices() -> list[torch.device]:
    """The CPU, and the current CUDA device when one is visible."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def run(progress: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
    """Every case on every device; `progress` is called with each result as it is known."""
    results = []
    for device in devices():
        for backend in backends.available_backends(device):
            if backend == "reference":
                continue
            for algorithm in ALGORITHMS:
                for dtype in DTYPES:
                    result = check_case(device, backend, algorithm, dtype)
                    results.append(result)
                    if progress is not None:
                        progress(result)
    return results


def check_case(device: torch.device, backend: str, algorithm: str, dtype: str) -> CaseResult:
    """Run one case against the reference on the same device; an exception is a failed case."""
    storage, _ = DTYPES[dtype]
    atol, rtol = TOLERANCES[storage]
    case = dict(device=str(device), backend=backend, algorithm=algorithm, dtype=dtype, atol=atol, rtol=rtol)
    try:
        expected, reference_s = _trajectory(device, "reference", algorithm, dtype)
        actual, step_s = _trajectory(device, backend, algorithm, dtype)
    except Exception as exc:  # a crashing backend is what this command exists to report
        return CaseResult(**case, max_abs_error=None, step_ms=None, reference_step_ms=None, ok=False,
                          error=f"{type(exc).__name__}: {exc}")
    ok, worst = True, 0.0
    for name in expected:
        a, r = actual[name].double().cpu(), expected[name].double().cpu()
        both_nan = torch.isnan(a) & torch.isnan(r)
        diff = torch.where(both_nan, 0.0, (a - r).abs())
        if diff.numel():
            worst = max(worst, float(diff.nan_to_num(nan=float("inf")).max()))
        ok &= bool((diff <= atol + rtol * r.abs().nan_to_num(nan=0.0)).all())
    return CaseResult(**case, max_abs_error=worst, step_ms=1e3 * step_s, reference_step_ms=1e3 * reference_s, ok=ok)


def _trajectory(device: torch.device, backend: str, algorithm: str, dtype: str) -> tuple[dict[str, Tensor], float]:
    """STEPS steps on seeded data; every parameter, state tensor and trust ratio by name, and the
    shortest time of the steps after the first."""
    storage, master = DTYPES[dtype]
    cls, options = ALGORITHMS[algorithm]
    generator = torch.Generator().manual_seed(0)
    params = [(torch.randn(shape, generator=generator) * 0.5).to(device, storage).requires_grad_()
              for shape in SHAPES]
    adapting = len(SHAPES) - NON_ADAPTING
    groups = [{"params": params[:adapting]}, {"params": params[adapting:], "weight_decay": 0.0}]
    optimizer = cls(groups, backend=backend, master_weights=master, **options)
    optimizer.record_trust_ratios()
    seconds = float("inf")
    for step in range(STEPS):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=generator) + 0.3 * p.detach().float().cpu()).to(device, storage)
        _synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        _synchronize(device)
        if step > 0:
            seconds = min(seconds, time.perf_counter() - start)
    out = {f"param {i} {tuple(p.shape)}": p.detach() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        out.update({f"param {i} state[{key!r}]": value for key, value in optimizer.state[p].items()})
    for g, ratios in enumerate(optimizer.trust_ratios or []):
        if ratios is not None:
            out[f"group {g} trust ratios"] = ratios
    return out, seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_json(results: list[CaseResult]) -> list[dict[str, Any]]:
    """The results as plain dicts."""
    return [asdict(r) for r in results]


def describe(result: CaseResult) -> str:
    """One line: the case, its verdict, max error against the tolerance, and step times."""
    name = f"{result.device:<5} {result.backend:<8} {result.algorithm:<5} {result.dtype:<12}"
    if result.error is not None:
        return f"{name} {'ERROR':<8} {result.error}"
    verdict = "ok" if result.ok else "MISMATCH"
    tolerance = f"(tol {result.atol:g} + {result.rtol:g}·|ref|)"
    return (f"{name} {verdict:<8} max |Δ| {result.max_abs_error:.1e} {tolerance:<25} "
            f"step {result.step_ms:7.3f} ms, reference {result.reference_step_ms:7.3f} ms")
