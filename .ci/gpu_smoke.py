"""The GPU session's smoke stage: do the GPU kernels run, and do they agree with the reference?

One case per GPU backend (native, triton) × algorithm (LAMB, LARS) × dtype (fp32, bf16 + fp32 master),
each fastlars.selfcheck.check_case: 3 seeded steps on the GPU against the reference backend on the
same GPU, every parameter, state tensor and trust ratio compared within the test suite's tolerance.
One line per case as it finishes (max |Δ| against the tolerance), so that even a call cut short says
what ran. Exit status: 0 when every case matches, 1 when one mismatches, errors or its backend is not
usable on the GPU (with the reason), 2 when no CUDA GPU is visible.

    python3 .ci/gpu_smoke.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working tree's fastlars

import torch

from fastlars import backends, selfcheck

BACKENDS = ("native", "triton")
ALGORITHMS = ("lamb", "lars")
DTYPES = ("fp32", "bf16+master")


def main() -> int:
    """Run the cases; the exit status as in the module docstring."""
    if not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA GPU; none is visible to torch", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    failed = 0
    start = time.perf_counter()
    for backend in BACKENDS:
        reason = backends.unavailable_reason(backend, device)
        if reason is not None:
            print(f"cuda  {backend:<8} NOT USABLE on {torch.cuda.get_device_name()}: {reason}", flush=True)
            failed += len(ALGORITHMS) * len(DTYPES)
            continue
        for algorithm in ALGORITHMS:
            for dtype in DTYPES:
                result = selfcheck.check_case(device, backend, algorithm, dtype)
                print(selfcheck.describe(result), flush=True)
                failed += not result.ok
    total = len(BACKENDS) * len(ALGORITHMS) * len(DTYPES)
    print(f"smoke: {total - failed} of {total} cases match the reference in {time.perf_counter() - start:.1f} s")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
