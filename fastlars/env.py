"""env_report(): what was built and what can run here, for bug reports and for picking a backend."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from fastlars import backends
from fastlars._extension import extension, extension_error


def env_info() -> dict[str, Any]:
    """The facts of env_report() as plain JSON-able values (``python -m fastlars --json`` prints them).

    ``backends`` maps each device type to ``{"auto": name, name: None (usable) or why not}``.
    """
    ext = extension()
    if ext is None:
        compiled: dict[str, Any] = {"loaded": False, "error": extension_error()}
    else:
        compiled = {"loaded": True, "kernels": list(getattr(ext, "kernel_devices", lambda: [])()),
                    "cpu_isa": getattr(ext, "cpu_isa", lambda: "unknown")(),
                    "cpu_parallel": getattr(ext, "cpu_parallel", lambda: None)()}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    usable: dict[str, dict[str, str | None]] = {}
    for dev in devices:
        device = torch.device(dev)
        usable[dev] = {"auto": backends.resolve("auto", device)}
        usable[dev].update({name: backends.unavailable_reason(name, device) for name in backends.BACKENDS})
    return {
        "fastlars": _version(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu_visible": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "triton": _triton_version(),
        "extension": compiled,
        "backends": usable,
    }


def env_report(info: dict[str, Any] | None = None) -> str:
    """A multi-line report: versions, the compiled extension, and each backend per device."""
    info = env_info() if info is None else info
    gpus = f", {', '.join(info['gpus'])}" if info["gpus"] else ""
    lines = [
        f"fastlars {info['fastlars']}",
        f"python {info['python']} on {info['machine']} ({info['cpu']}, {info['cpu_count']} CPUs)",
        f"torch {info['torch']} (CUDA {info['cuda']}, GPU visible: {info['gpu_visible']}{gpus})",
        f"triton {info['triton']}",
    ]
    ext = info["extension"]
    if not ext["loaded"]:
        lines.append(f"fastlars._C: not loaded: {ext['error']}")
    else:
        lines.append(f"fastlars._C: loaded, kernels for {', '.join(ext['kernels']) or 'no device'}; "
                     f"CPU loops: {ext['cpu_isa']}{_threads(ext.get('cpu_parallel'))}")
    for dev, usable in info["backends"].items():
        lines.append(f"backends on {dev} (auto -> {usable['auto']}):")
        for name in backends.BACKENDS:
            reason = usable[name]
            lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def _threads(report: dict[str, Any] | None) -> str:
    if not report:
        return ""
    return f", {report['runtime']} on {report['threads_used']} of {report['threads']} threads"


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
