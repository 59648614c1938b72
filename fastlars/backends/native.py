"""The native backend: C++ (CPU) and CUDA multi-tensor kernels from csrc/, loaded from fastlars._C.

Importing this module never fails: when the extension is missing the backend reports itself
unavailable with the reason, and ``backend="auto"`` moves on to the next candidate.
"""

from __future__ import annotations

import torch

from fastlars._extension import extension, extension_error


def unavailable_reason(device: torch.device) -> str | None:
    """None when fastlars._C is built with kernels for ``device``'s type, else why not."""
    ext = extension()
    if ext is None:
        return extension_error()
    kernels = getattr(ext, "kernel_devices", lambda: [])()
    if device.type not in kernels:
        built = ", ".join(kernels) or "no device"
        return f"fastlars._C has kernels for {built}, not for {device.type}"
    return None
