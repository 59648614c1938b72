"""Backend registry: which implementations exist, which can run on a device, and which "auto" picks.

A backend is a module with ``unavailable_reason(device)``, ``grad_norms``, ``lars_step`` and
``lamb_step`` (signatures of :mod:`fastlars.backends.reference`). Modules are imported lazily so a
missing optional dependency (triton, the compiled extension) never breaks ``import fastlars``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS: tuple[str, ...] = ("reference", "foreach", "triton", "native")
"""Every backend name a user may pass as ``backend=``, besides ``"auto"``."""

_MODULES = {
    "reference": "fastlars.backends.reference",
    "foreach": "fastlars.backends.foreach",
    "triton": "fastlars.backends.triton",
    "native": "fastlars.backends.native",
}

# Order "auto" tries per device type; the first available wins. On CUDA, native before triton is NOT
# yet a measured rule (no GPU was available when the Triton backend landed): measure it with
#   python benchmarks/gpu_step.py --backends native,triton --peers none
# (per-step time of both backends on the BERT-Large and ResNet-50 parameter sets, fp32 and bf16+master)
# and put the faster one first, per algorithm if they differ.
_AUTO_ORDER = {
    "cuda": ("native", "triton", "foreach"),
    "cpu": ("native", "foreach"),
}
_AUTO_FALLBACK = ("foreach",)

ENV_OVERRIDE = "FASTLARS_BACKEND"
"""Environment variable naming the backend that ``backend="auto"`` resolves to."""


def validate_backend_name(name: object) -> str:
    """Return ``name`` if it is "auto" or a known backend, else raise ValueError naming the choices."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
    return str(name)


_LOADED: dict[str, ModuleType] = {}
_USABLE: set[tuple[str, str]] = set()  # (backend, device type) pairs found usable


def load(name: str) -> ModuleType:
    """Import a backend module by name (cached, so a traced step sees a plain dict lookup)."""
    module = _LOADED.get(name)
    if module is None:
        module = importlib.import_module(_MODULES[validate_backend_name(name)])
        _LOADED[name] = module
    return module


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else a sentence saying why not."""
    try:
        module = load(name)
    except ImportError as exc:  # an optional dependency is missing
        return f"cannot be imported ({exc})"
    return module.unavailable_reason(device)


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for a group on ``device``: explicit names must be usable, else raise."""
    name = validate_backend_name(name)
    if name == "auto":
        override = os.environ.get(ENV_OVERRIDE)
        if override:
            return resolve(validate_backend_name(override), device)
        for candidate in _AUTO_ORDER.get(device.type, _AUTO_FALLBACK):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "foreach"
    if (name, device.type) in _USABLE:  # a dict lookup for torch.compile once the backend was checked
        return name
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not usable on {device}: {reason}")
    _USABLE.add((name, device.type))
    return name


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable on ``device`` (default: CUDA when present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]
