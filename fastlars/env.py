"""env_report(): what was built and what can run here, for bug reports and for picking a backend."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from fastlars import backends
from fastlars._extension import extension, extension_error


def env_report() -> str:
    """A multi-line report: versions, the compiled extension, and each backend per device."""
    lines = [
        f"fastlars {_version()}",
        f"python {platform.python_version()} on {platform.machine()} ({cpu_name()}, {os.cpu_count()} CPUs)",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})",
        f"triton {_triton_version()}",
    ]
    ext = extension()
    if ext is None:
        lines.append(f"fastlars._C: not loaded: {extension_error()}")
    else:
        kernels = getattr(ext, "kernel_devices", lambda: [])()
        isa = getattr(ext, "cpu_isa", lambda: "unknown")()
        lines.append(f"fastlars._C: loaded, kernels for {', '.join(kernels) or 'no device'}; CPU loops: {isa}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        device = torch.device(dev)
        lines.append(f"backends on {dev} (auto -> {backends.resolve('auto', device)}):")
        for name in backends.BACKENDS:
            reason = backends.unavailable_reason(name, device)
            lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version() -> str:
    from fastlars import __version__

    return __version__


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__
