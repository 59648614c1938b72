"""The dry run of .ci/gpu_session.sh on a machine without a GPU: every stage walked and skipped with
its reason, the limits of each call within 480 s, and exit status 2 naming what was skipped."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu_session.sh"
CALLS = {"main": ["build", "smoke", "tests", "memcheck", "racecheck", "bench"], "compile": ["build", "bench_compile"],
         "train": ["build", "train"]}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the session would really run")


def _fake_nvidia_smi(folder: Path, output: str, status: int) -> None:
    folder.mkdir(exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{output}'\nexit {status}\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)


def _dry_run(tmp_path: Path, bin_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    return proc, (out / "session.log").read_text()


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(("smi", "reason"), [
    (None, "no nvidia-smi on PATH"),
    (("No devices were found", 6), "nvidia-smi lists no GPU (No devices were found)"),
    (("GPU 0: NVIDIA H200 (UUID: GPU-fake)", 0), "sees no CUDA device although nvidia-smi lists: GPU 0: NVIDIA H200"),
], ids=["no-smi", "smi-no-gpu", "smi-gpu-torch-none"])
def test_dry_run_walks_and_skips_every_stage(tmp_path: Path, call: str, smi: tuple[str, int] | None,
                                              reason: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi is not None:
        _fake_nvidia_smi(bin_dir, *smi)
    elif any((Path(d) / "nvidia-smi").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("this machine has an nvidia-smi in /usr/bin or /bin")
    proc, log = _dry_run(tmp_path, bin_dir, *([] if call == "main" else [call]))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    stages = CALLS[call]
    walked = re.findall(r"^== (\w+): SKIPPED after 0 s \(limit (\d+) s\): no GPU: (.*)$", log, re.MULTILINE)
    assert [name for name, _, _ in walked] == stages
    assert all(reason in why for _, _, why in walked)
    assert sum(int(limit) for _, limit, _ in walked) <= 480
    assert f"limits sum to {sum(int(limit) for _, limit, _ in walked)} s" in log
    assert log.rstrip().splitlines()[-1].startswith(f"gpu_session: SKIPPED {' '.join(stages)} (")
    assert log.strip() == proc.stdout.strip()  # the log holds what the call prints


def test_unknown_call_is_refused(tmp_path: Path) -> None:
    proc, _ = _dry_run(tmp_path, tmp_path, "everything")
    assert proc.returncode == 64 and "usage: bash .ci/gpu_session.sh [compile|train]" in proc.stderr
