"""The dry run of .ci/gpu_session.sh on a machine without a GPU: every stage walked and skipped with
its reason, the limits of each call within 480 s, and exit status 2 naming what was skipped; the smoke
stage's case list and its int8 comparison (run on the CPU kernels), the sanitizer workload on the CPU."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu_session.sh"
CALLS = {"main": ["build", "smoke", "tests", "memcheck", "racecheck", "bench"], "compile": ["build", "bench_compile"],
         "train": ["build", "train"], "oracle": ["build", "smoke", "oracle_tests", "memcheck", "bench_lowbit"],
         "lowbit": ["build", "smoke", "lowbit_tests", "bench_lowbit", "profile_lowbit"]}

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
    assert proc.returncode == 64 and "usage: bash .ci/gpu_session.sh [compile|train|oracle|lowbit]" in proc.stderr


# ------------------------------------------------------------- the session's scripts, without a GPU
def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke():
    return _load(ROOT / ".ci" / "gpu_smoke.py", "gpu_smoke")


def test_smoke_cases_cover_int8_state_on_both_backends(smoke) -> None:
    """The smoke stage's case list: per GPU backend its four fp32-state cases, then int8 state (bf16 params,
    fp32 masters) for LAMB and LARS, so even a cut-short call reports the native low-precision kernels."""
    assert smoke.cases() == [(b, a, d) for b in ("native", "triton")
                             for a, d in [("lamb", "fp32"), ("lamb", "bf16+master"), ("lars", "fp32"),
                                          ("lars", "bf16+master"), ("lamb", "bf16+master int8"),
                                          ("lars", "bf16+master int8")]]


def test_smoke_without_a_gpu_exits_2(smoke, capsys) -> None:
    assert smoke.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_smoke_int8_case_runs_its_comparison_on_the_cpu(smoke, algorithm: str) -> None:
    """The smoke's int8 case with the native CPU kernels against the reference: the comparison the GPU run makes
    (every tensor int8, a ragged last block each), and it passes here."""
    from fastlars import backends

    reason = backends.low_precision_unavailable_reason("native", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"native CPU low-precision kernels: {reason}")
    result = smoke.lowbit_case(torch.device("cpu"), "native", algorithm)
    assert result.ok, result.describe("cpu")
    buffers = 2 if algorithm == "lamb" else 1
    assert result.worst["codes"] == buffers * sum(math.prod(s) for s in smoke.LOWBIT_SHAPES)
    assert "int8" in result.describe("cpu") and " ok " in result.describe("cpu")


def test_smoke_int8_comparison_flags_codes_masters_and_ratios(smoke) -> None:
    """compare_lowbit fails a step whose codes are 2 apart, whose masters moved or whose ratios differ."""
    cpu = torch.device("cpu")
    _, ref = smoke._lowbit_optimizer(cpu, "reference", "lamb")
    params, opt = smoke._lowbit_optimizer(cpu, "reference", "lamb")
    for p_ref, p in zip(ref.param_groups[0]["params"], params):
        p_ref.grad = p.grad = torch.ones_like(p)
    ref.step()
    opt.step()
    result = smoke.LowbitResult("reference", "lamb")
    smoke.compare_lowbit(ref, opt, "lamb", result, 1)
    assert result.ok and result.worst["codes_differing"] == 0, result.failures
    state = opt.state[params[2]]
    state["exp_avg"].view(torch.int8)[:3] -= 2
    state["master_param"][0] += 1e-2
    opt.trust_ratios[0][1] *= 1.001
    smoke.compare_lowbit(ref, opt, "lamb", result, 2)
    assert any("codes 2 apart" in f for f in result.failures), result.failures
    assert any("masters" in f for f in result.failures) and any("trust ratios" in f for f in result.failures)


def test_sanitizer_workload_steps_on_the_cpu() -> None:
    """tests/cuda_sanitizer_check.py's --quick workload (its low-precision runs included) on the CPU's native
    kernels: its arguments parse, every run builds and steps; without --device cpu and a GPU it exits 2."""
    script = ROOT / "tests" / "cuda_sanitizer_check.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu", "--count-ops"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "low-precision state" in proc.stdout and "sanitizer workload finished" in proc.stdout
    proc = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "unusable" in proc.stderr


def test_sanitizer_low_precision_runs() -> None:
    """--quick's low-precision part stays small (racecheck's 50 s on an H200): 3 storages per algorithm, aligned
    only, 4 tensors; the full workload covers every storage, both alignments and every option set."""
    checker = _load(ROOT / "tests" / "cuda_sanitizer_check.py", "cuda_sanitizer_check")
    quick, full = checker.lowbit_runs(quick=True), checker.lowbit_runs(quick=False)
    assert len(quick) == 6 and all(len(shapes) == 4 and not misaligned for *_, shapes, misaligned in quick)
    assert checker.LOWBIT_QUICK_STEPS == 2
    options = [run[1] for run in full]
    assert {o["state_dtype"] for o in options} == {"int8", "bf16"}
    assert any(o.get("stochastic_rounding") and o.get("adapt") is False for o in options)
    assert any(o.get("min_quantized_size") == 0 for o in options)
    assert {(run[2], run[3]) for run in full} == {(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True), (torch.float16, True)}


def test_smoke_main_reports_every_case_and_keeps_its_budget(smoke, monkeypatch, capsys) -> None:
    """main() with the GPU and the cases faked: one line per case in cases() order; with the budget spent no
    case starts, each is listed as not run, and the exit status is 0 unless a case that ran failed."""
    from fastlars import selfcheck

    monkeypatch.setattr(smoke.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(smoke.backends, "unavailable_reason", lambda backend, device: None)
    monkeypatch.setattr(smoke.backends, "low_precision_unavailable_reason", lambda backend, device: None)
    ran = []

    def check_case(device, backend, algorithm, dtype):
        ran.append((backend, algorithm, dtype))
        return selfcheck.CaseResult(str(device), backend, algorithm, dtype, 0.0, 1e-6, 1e-5, 1.0, 1.0, ok=True)

    def lowbit_case(device, backend, algorithm):
        ran.append((backend, algorithm, smoke.LOWBIT_DTYPE))
        result = smoke.LowbitResult(backend, algorithm, seconds=0.1)
        if backend == "triton" and algorithm == "lars":
            result.failures.append("step 1: 3 of 5854 codes differ")
        return result

    monkeypatch.setattr(smoke.selfcheck, "check_case", check_case)
    monkeypatch.setattr(smoke, "lowbit_case", lowbit_case)
    assert smoke.main(["--budget", "1e9"]) == 1  # triton LARS int8 mismatched
    out = capsys.readouterr().out.splitlines()
    assert ran == smoke.cases()
    assert sum("MISMATCH" in line for line in out) == 1 and "3 of 5854 codes differ" in out[11]
    assert out[-1].startswith("smoke: 11 of 12 cases match the reference")
    ran.clear()
    assert smoke.main(["--budget", "-1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert ran == [] and sum("NOT RUN" in line for line in out) == 12
    assert out[-1].startswith("smoke: 0 of 12 cases match the reference, 12 not run (budget)")


# ------------------------------------------------------------- benchmarks/gpu_profile.py, without a GPU
@pytest.fixture(scope="module")
def gpu_profile():
    return _load(ROOT / "benchmarks" / "gpu_profile.py", "gpu_profile")


def test_profile_cases_add_each_low_precision_state_per_backend(gpu_profile) -> None:
    """fp32 state: both launch plans, Triton and the fused peer; each listed low-precision state adds native and
    Triton rows, whose factories build the optimizer with that state (checked on CPU params)."""
    labels = [label for label, _, _ in gpu_profile.cases("lamb", True, ["fp32", "int8"])]
    assert labels == ["fastlars.native lamb (onepass)", "fastlars.native lamb (wave)", "fastlars.triton lamb",
                      "torch.AdamW(fused)", "fastlars.native lamb [int8 state]", "fastlars.triton lamb [int8 state]"]
    low = gpu_profile.cases("lars", True, ["bf16"])
    assert [label for label, _, _ in low] == ["fastlars.native lars [bf16 state]", "fastlars.triton lars [bf16 state]"]
    assert all(plan is None for _, _, plan in low)
    params = [torch.zeros(64, 64, dtype=torch.bfloat16, requires_grad=True)]
    opt = low[0][1](params)
    assert opt.param_groups[0]["state_dtype"] == "bf16" and opt.param_groups[0]["backend"] == "native"
    assert opt.param_groups[0]["master_weights"] is True


def test_profile_refuses_an_unknown_state_before_looking_for_a_gpu(gpu_profile, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_profile.main(["--state", "fp32,int4"])
    assert exit_info.value.code == 2 and "--state: unknown int4" in capsys.readouterr().err
    assert gpu_profile.main(["--state", "int8"]) == 2  # no GPU here
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------- .ci/gpu_build.sh: never a stale extension
def _build_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A tree with the build script, a setup.py and csrc/, and a stand-in python: the fingerprint script runs,
    the extension check passes, pip "builds" fastlars/_C.built.so; every call is logged."""
    tree = tmp_path / "tree"
    (tree / ".ci").mkdir(parents=True)
    for name in ("gpu_build.sh", "source_fingerprint.py"):
        shutil.copy(ROOT / ".ci" / name, tree / ".ci" / name)
    (tree / "setup.py").write_text("# setup\n")
    (tree / "csrc").mkdir()
    (tree / "csrc" / "kernel.cu").write_text("// version 1\n")
    (tree / "fastlars").mkdir()
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path / "calls"}
case "$1" in
  .ci/source_fingerprint.py) exec {sys.executable} "$@" ;;
  .ci/gpu_extension_check.py) exit 0 ;;
  -m) touch fastlars/_C.built.so ;;
esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return tree, {**os.environ, "PYTHON": str(fake)}


def _build(tree: Path, env: dict[str, str]) -> tuple[str, list[str]]:
    calls = tree.parent / "calls"
    calls.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(tree / ".ci" / "gpu_build.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, calls.read_text().splitlines()


def test_build_uses_a_prebuilt_only_when_it_was_built_from_these_sources(tmp_path: Path) -> None:
    tree, env = _build_tree(tmp_path)
    prebuilt = tree / ".gpu-prebuilt"
    prebuilt.mkdir()
    (prebuilt / "_C.prebuilt.so").write_text("binary")
    (prebuilt / "SOURCES").write_text("0" * 64 + "\n")  # built from other sources
    out, calls = _build(tree, env)
    assert "built from other sources" in out and any(c.startswith("-m pip") for c in calls)
    assert sorted(p.name for p in (tree / "fastlars").glob("_C*.so")) == ["_C.built.so"]

    for so in (tree / "fastlars").glob("_C*.so"):
        so.unlink()
    fingerprint = subprocess.run([sys.executable, str(tree / ".ci" / "source_fingerprint.py"), str(tree)],
                                 capture_output=True, text=True, check=True).stdout
    (prebuilt / "SOURCES").write_text(fingerprint)
    out, calls = _build(tree, env)
    assert "no compile" in out and not any(c.startswith("-m pip") for c in calls)
    assert sorted(p.name for p in (tree / "fastlars").glob("_C*.so")) == ["_C.prebuilt.so"]


def test_build_rebuilds_an_earlier_calls_extension_once_the_sources_change(tmp_path: Path) -> None:
    tree, env = _build_tree(tmp_path)
    _, calls = _build(tree, env)
    assert any(c.startswith("-m pip") for c in calls)  # nothing to reuse: compiled, then stamped
    out, calls = _build(tree, env)
    assert "no compile" in out and not any(c.startswith("-m pip") for c in calls)
    (tree / "csrc" / "kernel.cu").write_text("// version 2\n")
    out, calls = _build(tree, env)
    assert "was not built from these sources" in out and any(c.startswith("-m pip") for c in calls)
