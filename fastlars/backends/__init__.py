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

_LOW_PRECISION_MODULES = {
    "native": "fastlars.backends.native_lowbit",
    "triton": "fastlars.backends.triton.lowbit",
    "reference": "fastlars.backends.reference_lowbit",
}
"""Backends that step low-precision state (bf16 or int8 buffers) and stochastically rounded weights, and the
module that does it (signatures of :mod:`fastlars.backends.reference_lowbit`). The others take fp32 state
only; asked for low-precision state they raise instead of silently keeping fp32. "auto" tries them in the
device's auto order, then the reference: native (CPU and CUDA kernels; its unavailable_reason says why not
where the extension lacks them) before triton (CUDA, or the CPU under its interpreter) before the reference."""

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
    """Import a backend module by name (cached, so a traced step sees a plain dict lookup); "name:low_precision"
    is the module stepping low-precision state for backend name."""
    module = _LOADED.get(name)
    if module is None:
        base, _, variant = name.partition(":")
        table = _LOW_PRECISION_MODULES if variant == "low_precision" else _MODULES
        module = importlib.import_module(table[validate_backend_name(base)])
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


def supports_low_precision_state(name: str) -> bool:
    """Whether backend ``name`` can step bf16/int8 optimizer state and stochastically rounded weights."""
    return name in _LOW_PRECISION_MODULES


def load_low_precision(name: str) -> ModuleType:
    """The module stepping low-precision state for backend ``name`` (ValueError when it has none)."""
    if not supports_low_precision_state(name):
        raise ValueError(f"backend={name!r} steps fp32 state only; low-precision state (state_dtype='bf16'/'int8' "
                         f"or stochastic_rounding) runs on {', '.join(map(repr, _LOW_PRECISION_MODULES))}")
    return load(f"{name}:low_precision")


def resolve_low_precision(name: str, device: torch.device) -> str:
    """The concrete backend for a group with low-precision state on ``device``: for "auto" (and the
    FASTLARS_BACKEND override when it names a backend that cannot step such state on ``device``, e.g.
    native on a build without the CUDA low-precision kernels) the first of the device's "auto" order that
    steps such state, else the reference; an explicit name must step it (ValueError)."""
    name = validate_backend_name(name)
    if name == "auto":
        override = os.environ.get(ENV_OVERRIDE)
        if (override and supports_low_precision_state(override)
                and low_precision_unavailable_reason(override, device) is None):
            return resolve(override, device)
        for candidate in (*_AUTO_ORDER.get(device.type, _AUTO_FALLBACK), "reference"):
            if supports_low_precision_state(candidate) and low_precision_unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = low_precision_unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot step low-precision state on {device}: {reason}")
    return resolve(name, device)


def low_precision_unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` steps low-precision state on ``device``, else why not (ValueError when it
    never does)."""
    reason = unavailable_reason(name, device)
    return reason if reason is not None else load_low_precision(name).unavailable_reason(device)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable on ``device`` (default: CUDA when present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]
