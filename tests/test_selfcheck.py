"""`python -m fastlars`: the environment report and every usable backend stepped against the reference."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastlars
from fastlars import __main__ as cli
from fastlars import backends, selfcheck

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine the check of small tensors takes 30× longer with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_json_report_of_every_backend_dtype_and_algorithm() -> None:
    """The command as a user runs it: exit 0, one JSON object, one matching case per backend, algorithm
    and dtype on the CPU (the reference is what the others are compared with)."""
    proc = subprocess.run([sys.executable, "-m", "fastlars", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["steps"] == selfcheck.STEPS
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["fastlars"] == fastlars.__version__
    assert env["backends"]["cpu"]["reference"] is None and env["backends"]["cpu"]["auto"] in backends.BACKENDS
    expected = {(b, a, d) for b in fastlars.available_backends("cpu") if b != "reference"
                for a in selfcheck.ALGORITHMS for d in selfcheck.DTYPES}
    cases = [c for c in report["cases"] if c["device"] == "cpu"]
    assert {(c["backend"], c["algorithm"], c["dtype"]) for c in cases} == expected
    assert {"foreach", "native"} & {c["backend"] for c in cases}
    for case in cases:
        assert case["ok"] and case["error"] is None
        assert 0.0 <= case["max_abs_error"] <= case["atol"] + case["rtol"] * 10
        assert math.isfinite(case["step_ms"]) and case["step_ms"] > 0


def test_text_report(capsys: pytest.CaptureFixture[str], one_thread) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fastlars {fastlars.__version__}\n")
    assert "backends on cpu (auto -> " in out
    assert "cpu   foreach  lamb  bf16+master  ok       max |Δ| " in out
    assert out.rstrip().endswith("cases match the reference")
    # The README's troubleshooting output has the command's current format, line for line: every case
    # line of a backend usable here, numbers aside (a hand-edited or stale copy fails).
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("$ OMP_NUM_THREADS=1 python -m fastlars"):]
    block = block[:block.index("```")]
    ours = _self_check_lines(out)
    usable = {line.split()[1] for line in ours if line.startswith("cpu ")}
    documented = [line for line in _self_check_lines(block) if not line.startswith("cpu ") or line.split()[1] in usable]
    assert documented == ours
    assert "openmp on 1 of 1 threads" in block or "openmp" not in block  # it says it ran on one thread


def _self_check_lines(text: str) -> list[str]:
    """The self-check part of the text report with every number as # and runs of spaces as one."""
    lines = text[text.index("self-check: "):].splitlines()
    lines = lines[:next(i for i, line in enumerate(lines) if line.endswith("cases match the reference")) + 1]
    return [" ".join(re.sub(r"\d+(\.\d+)?(e[-+]\d+)?", "#", line).split()) for line in lines if line.strip()]


def _corrupting(module):
    """A backend module like `module` whose LARS update is off by 1e-3 in the first parameter."""
    class Corrupt:
        def __getattr__(self, name):
            return getattr(module, name)

        def lars_step(self, params, *args, **kwargs):
            module.lars_step(params, *args, **kwargs)
            params[1].add_(1e-3)

        def lamb_step(self, *args, **kwargs):
            raise RuntimeError("kernel exploded")

    return Corrupt()


def test_a_wrong_or_crashing_backend_fails_the_check(monkeypatch, capsys: pytest.CaptureFixture[str],
                                                     one_thread) -> None:
    monkeypatch.setitem(backends._LOADED, "foreach", _corrupting(backends.load("foreach")))
    monkeypatch.setattr(selfcheck, "DTYPES", {"fp32": selfcheck.DTYPES["fp32"]})
    assert cli.main(["--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    foreach = {(c["algorithm"], c["dtype"]): c for c in report["cases"] if c["backend"] == "foreach"}
    assert not foreach["lars", "fp32"]["ok"] and foreach["lars", "fp32"]["max_abs_error"] >= 1e-3
    assert foreach["lamb", "fp32"]["error"] == "RuntimeError: kernel exploded"
    others = [c for c in report["cases"] if c["backend"] != "foreach"]
    assert all(c["ok"] for c in others)
    assert cli.main([]) == 1
    out = capsys.readouterr().out
    assert "cpu   foreach  lars  fp32         MISMATCH max |Δ| " in out
    assert "cpu   foreach  lamb  fp32         ERROR    RuntimeError: kernel exploded" in out
    assert "FAILED: cpu/foreach/lars/fp32, cpu/foreach/lamb/fp32" in out
    monkeypatch.setattr(sys, "argv", ["fastlars"])
    monkeypatch.delitem(sys.modules, "fastlars.__main__")  # runpy runs it afresh, as `-m` does
    with pytest.raises(SystemExit) as exited:  # `python -m fastlars` as the interpreter runs it
        runpy.run_module("fastlars", run_name="__main__")
    assert exited.value.code == 1
    assert "FAILED: cpu/foreach/lars/fp32, cpu/foreach/lamb/fp32" in capsys.readouterr().out
