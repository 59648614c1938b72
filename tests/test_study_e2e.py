"""The quick study end to end on the real digits data: killed mid-way, resumed, re-invoked; then the
report files and the analysis checked against the run records it produced."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import pytest

from train.study import analysis, summary
from train.study.__main__ import main
from train.study.presets import PRESETS
from train.study.report import PLOT_FILES

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.02
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class QuickStudy:
    out: Path
    total: int
    before_resume: dict[str, tuple[int, bytes]]
    after_resume: dict[str, tuple[int, bytes]]
    meta_resume: dict
    meta_again: dict
    records: list[dict]
    survivors: list[int]


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "train.study", "--preset", "quick", "--out", str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _snapshot(cache: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(cache.glob("*.json"))}


def _live_processes_of_group(pgid: int, wait_s: float) -> list[int]:
    """Pids (not zombies) left in process group `pgid` once `wait_s` has passed or none is left (Linux /proc)."""
    deadline = time.monotonic() + wait_s
    while True:
        live = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(int(stat.parent.name))
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> QuickStudy:
    out = tmp_path_factory.mktemp("quick-study")
    cache = out / "cache"
    proc = subprocess.Popen(_command(out), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(cache.glob("*.json"))) < 3:
        if proc.poll() is not None:
            pytest.fail(f"quick study ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("quick study wrote no 3 records within 240 s")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    survivors = _live_processes_of_group(proc.pid, wait_s=15.0)
    before = _snapshot(cache)

    resumed = subprocess.run(_command(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta_resume = json.loads((out / "study.json").read_text())
    after = _snapshot(cache)

    again = subprocess.run(_command(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    meta_again = json.loads((out / "study.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]
    return QuickStudy(out, meta_resume["runs"], before, after, meta_resume, meta_again, records, survivors)


def test_killed_study_resumes_without_redoing_finished_runs(quick: QuickStudy) -> None:
    assert 3 <= len(quick.before_resume) < quick.total, "the kill must land mid-way"
    assert quick.meta_resume["cached"] == len(quick.before_resume)
    assert quick.meta_resume["executed"] == quick.total - len(quick.before_resume)
    for name, snap in quick.before_resume.items():
        assert quick.after_resume[name] == snap, f"{name} was rewritten on resume"
    assert len(quick.after_resume) == quick.total


def test_parallel_workers_die_with_a_killed_study(quick: QuickStudy) -> None:
    """The quick preset trains one run per core at once in worker processes; SIGKILL of the study leaves
    none of them running (and so none writing into a run folder the resumed study trains again)."""
    assert quick.meta_resume["jobs"] == (os.cpu_count() or 1)
    assert quick.survivors == [], f"study workers still alive after the kill: {quick.survivors}"


def test_second_invocation_trains_nothing(quick: QuickStudy) -> None:
    assert quick.meta_again["executed"] == 0
    assert quick.meta_again["cached"] == quick.total
    assert _snapshot(quick.out / "cache") == quick.after_resume


def test_report_table_csv_and_every_plot(quick: QuickStudy) -> None:
    preset = PRESETS["quick"]
    report = (quick.out / "report.md").read_text()
    labels = [o.label for o in preset.optimizers]
    assert "| batch | steps | " + " | ".join(labels) + " |" in report
    for batch in preset.batches:
        assert f"\n| {batch} | " in report
    with (quick.out / "results.csv").open() as f:
        results = list(csv.DictReader(f))
    assert {(r["optimizer"], int(r["batch"])) for r in results} == {(o, b) for o in labels for b in preset.batches}
    with (quick.out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == quick.total
    for name in PLOT_FILES:
        data = (quick.out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"({name})" in report
        image = matplotlib.image.imread(quick.out / name)
        assert image.shape[0] > 200 and image.shape[1] > 300


def _runs_csv(quick: QuickStudy) -> list[dict[str, str]]:
    with (quick.out / "runs.csv").open() as f:
        return list(csv.DictReader(f))


def test_best_lr_cells_are_the_best_runs(quick: QuickStudy) -> None:
    rows = [r for r in _runs_csv(quick) if r["budget"] == "epochs"]
    cells = analysis.best_cells(quick.records)
    for c in cells:
        mine = [r for r in rows if r["optimizer"] == c.optimizer and int(r["batch"]) == c.batch]
        assert len(mine) == len(PRESETS["quick"].lr_factors) == c.runs
        assert c.top1 == pytest.approx(max(float(r["top1"]) for r in mine), abs=1e-4)
        assert c.lr_at_edge == (c.lr_factor in (min(float(r["lr_factor"]) for r in mine),
                                                max(float(r["lr_factor"]) for r in mine)))


def _holds_to(row: list[tuple[int, float]], tolerance: float) -> tuple[int, bool]:
    """Oracle written apart from analysis.holding: walk right from the peak until the first drop."""
    peak_batch, peak = max(row, key=lambda bt: (bt[1], -bt[0]))
    last = peak_batch
    for b, t in sorted(row):
        if b > peak_batch:
            if t < peak - tolerance:
                return last, True
            last = b
    return last, False


def test_summary_claims_follow_from_the_numbers(quick: QuickStudy) -> None:
    cells = analysis.best_cells(quick.records)
    found = {f.name: f for f in summary.findings(quick.records, cells, TOLERANCE, "sgd")}
    table = {}
    for c in cells:
        table.setdefault(c.optimizer, []).append((c.batch, c.top1))
    oracle = {opt: _holds_to(row, TOLERANCE) for opt, row in table.items()}
    hold = analysis.holding(cells, TOLERANCE)
    for opt, (holds_to, falls) in oracle.items():
        assert hold[opt].holds_to == holds_to and (hold[opt].falls_at is not None) == falls
        assert f"{opt}: peak {100 * hold[opt].peak:.1f}%" in found["every_optimizer_falls"].sentence
    assert found["every_optimizer_falls"].holds == all(falls for _, falls in oracle.values())
    for opt in ("lars", "lamb"):
        f = found[f"{opt}_beyond_sgd"]
        assert f.holds == (oracle[opt][0] > oracle["sgd"][0])
        assert f"B={oracle[opt][0]} vs B={oracle['sgd'][0]}" in f.sentence
        assert ("does NOT" in f.sentence) == (not f.holds)
    text = summary.summary_markdown(list(found.values()))
    shape = found["every_optimizer_falls"].holds and found["lars_beyond_sgd"].holds and found["lamb_beyond_sgd"].holds
    assert text.startswith("**The run shows the paper's shape**" if shape else "**The run does not show")
    largest = max(PRESETS["quick"].batches)
    winner = max((c for c in cells if c.batch == largest), key=lambda c: c.top1)
    sentence = found["largest_batch_winner"].sentence
    assert f"best optimizer is {winner.optimizer} with {100 * winner.top1:.1f}%" in sentence


def test_steps_to_target_match_history_and_perfect_scaling(quick: QuickStudy) -> None:
    target = PRESETS["quick"].target_accuracy
    for r in quick.records:
        evals = [(h["step"], h["top1"]) for h in r["result"]["history"] if h.get("top1") is not None]
        first = next((s for s, t in evals if t >= target), None)
        assert r["result"]["steps_to_target"] == first
    cells = analysis.best_cells(quick.records)
    for opt in analysis.optimizers_of(cells):
        points = analysis.target_scaling(cells, opt)
        products = {round(p.perfect * p.batch, 6) for p in points if p.perfect is not None}
        assert len(products) <= 1  # S_perfect(B)·B is constant: the perfect-scaling line
        for p in points:
            if p.efficiency is not None:
                assert p.efficiency == pytest.approx(p.perfect / p.steps)


def test_diffusion_and_noise_scale_from_the_records(quick: QuickStudy) -> None:
    preset = PRESETS["quick"]
    fits = analysis.diffusion(quick.records, preset.diffusion_optimizer)
    assert sorted(f.batch for f in fits if f.budget == "steps") == sorted(preset.diffusion_batches)
    by_key = {(r["budget"], r["batch"]): r for r in quick.records
              if r["optimizer"] == preset.diffusion_optimizer and r["lr_factor"] == 1.0}
    for f in fits:
        record = by_key[(f.budget, f.batch)]
        assert f.final == analysis.curve(record, "w_dist")[-1][1] > 0
        if f.budget == "steps":
            assert f.steps == record["result"]["steps"] == preset.fixed_steps
        else:
            assert f.steps == math.ceil(preset.epochs * math.ceil(quick.meta_resume["train_size"] / f.batch))
    estimates = analysis.noise_scale(quick.records)
    assert estimates and all(math.isfinite(e.b_simple) and e.b_simple > 0 for e in estimates)
    bcrit = analysis.predicted_critical_batch(estimates)
    assert f"{bcrit:.0f}" in next(f.sentence for f in summary.findings(
        quick.records, analysis.best_cells(quick.records), TOLERANCE, "sgd") if f.name == "noise_scale")


def test_imagenet_preset_prints_the_torchrun_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--preset", "imagenet", "--data", "/data/imagenet", "--out", str(tmp_path),
                 "--nproc-per-node", "8", "--nnodes", "4"]) == 0
    text = capsys.readouterr().out
    assert "torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d" in text
    assert "--nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 -m train --model resnet50" in text
    assert "-m train.study --preset imagenet --data /data/imagenet" in text
    assert "--global-batch 1281167" in text and "--global-batch 1024 " in text
    assert "--device-batch 256" in text and "--model resnet50" in text
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("argv", "match"), [
    (["--optimizers", "adam"], "no optimizer 'adam'"),
    (["--batches", "16,x"], "--batches"),
    (["--tolerance", "-1"], None),
])
def test_bad_arguments_exit_with_a_clear_message(argv: list[str], match: str | None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "quick", "--out", str(tmp_path), *argv])
    message = str(exc.value.code) if match else capsys.readouterr().err
    assert (match or "--tolerance") in message
    assert not (tmp_path / "cache").exists()
