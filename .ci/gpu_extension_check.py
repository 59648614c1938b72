"""Does the compiled fastlars._C in fastlars/ serve the visible GPU? The GPU session's build stage asks
before compiling: the extension must import against this torch, register a CUDA kernel for every
fastlars op, and run one on this GPU (its machine code or PTX loads for this arch) with the right answer.

    python3 .ci/gpu_extension_check.py     # exit 0: it serves; 1: it does not (the reason printed)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working tree's fastlars


def reason_unusable() -> str | None:
    """Why fastlars._C cannot run this GPU's steps, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        from fastlars import _C, _ops  # noqa: F401  (_ops defines the schemas the kernels must match)
    except Exception as exc:  # an ABI or symbol mismatch surfaces as ImportError/OSError/RuntimeError
        return f"fastlars._C does not import: {type(exc).__name__}: {exc}"
    if "cuda" not in list(_C.kernel_devices()):
        return f"fastlars._C was built without CUDA kernels (kernel_devices() = {list(_C.kernel_devices())})"
    for op in ("grad_norms", "lars_step_", "lamb_step_"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlars::{op}", "CUDA"):
            return f"fastlars::{op} has no CUDA kernel"
    grads = [torch.randn(n, device="cuda") for n in (1, 1000, 70_001)]
    try:
        norms = torch.ops.fastlars.grad_norms(grads, None).cpu()
    except Exception as exc:  # e.g. "no kernel image is available for execution on the device"
        return f"fastlars::grad_norms fails on {torch.cuda.get_device_name()}: {type(exc).__name__}: {exc}"
    expected = torch.stack([g.double().norm() for g in grads]).float().cpu()
    if not torch.allclose(norms, expected, rtol=1e-5, atol=0):
        return f"fastlars::grad_norms gives {norms.tolist()}, torch {expected.tolist()}"
    return None


def main() -> int:
    """Print the verdict; exit status 0 when the extension serves the GPU."""
    reason = reason_unusable()
    if reason is not None:
        print(f"gpu_extension_check: {reason}")
        return 1
    import torch

    print(f"gpu_extension_check: fastlars._C runs on {torch.cuda.get_device_name()} "
          f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
