"""Loads the compiled extension ``fastlars._C`` once; a missing or broken build is one warning."""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("fastlars._C"), None
    except ImportError as exc:
        reason = f"fastlars._C could not be imported ({exc}); the native backend is unavailable"
        warnings.warn(reason + ". Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=3)
        return None, reason


def extension() -> ModuleType | None:
    """The compiled module, or None when it is not built (a RuntimeWarning says why, once)."""
    return _load()[0]


def extension_error() -> str | None:
    """Why the compiled module is unavailable, or None when it loaded."""
    return _load()[1]
