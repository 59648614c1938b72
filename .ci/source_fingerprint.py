"""The fingerprint of what the compiled extension is built from: sha256 over setup.py and every file under
csrc/ (paths and contents, in sorted order). .ci/gpu_build.sh uses a compiled fastlars._C only when it was
built from sources with this fingerprint, so a GPU call never times or tests kernels older than the tree.

    python3 .ci/source_fingerprint.py      # prints the hex digest
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def fingerprint(root: Path) -> str:
    """sha256 of setup.py and csrc/**, each file's path relative to ``root`` then its bytes."""
    digest = hashlib.sha256()
    files = [root / "setup.py", *sorted(p for p in (root / "csrc").rglob("*") if p.is_file())]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


if __name__ == "__main__":
    print(fingerprint(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent))
