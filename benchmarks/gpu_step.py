"""GPU benchmark of one optimizer step (issue 4): `python -m benchmarks` with the GPU defaults.

    python benchmarks/gpu_step.py [extra flags of python -m benchmarks]

is `python -m benchmarks --device cuda --params bert_large,resnet50 --dtype fp32,bf16+master --repeat 50`
plus any flags given (later flags win). The cases, the compulsory-traffic counts, the copy bandwidth,
the JSON/Markdown/PNG under benchmarks/results/ and issue 4's targets (LAMB native on BERT-Large ≥ 80%
of copy bandwidth and ≥ 1.5× apex FusedLAMB; LARS native on ResNet-50 ≤ 1.2× SGD(fused)) all come
from the suite (benchmarks/suite.py, benchmarks/targets.py). Exits with status 2 without a CUDA GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

GPU_DEFAULTS = ["--device", "cuda", "--params", "bert_large,resnet50", "--dtype", "fp32,bf16+master", "--repeat", "50"]


def main(argv: list[str] | None = None) -> int:
    """Run the suite on the GPU with GPU_DEFAULTS followed by `argv`."""
    import torch

    if not torch.cuda.is_available():
        print("gpu_step: needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    from benchmarks.__main__ import main as suite_main

    return suite_main(GPU_DEFAULTS + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
    sys.exit(main())
