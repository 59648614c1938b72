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
from scipy import stats as scipy_stats

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
    stdout: str
    stderr: str


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

    assert main([*_command(out)[3:], "--no-progress"]) == 0  # in this process: nothing is left to train
    meta_again = json.loads((out / "study.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]
    return QuickStudy(out, meta_resume["runs"], before, after, meta_resume, meta_again, records, survivors,
                      resumed.stdout, resumed.stderr)


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
    assert "| steps | " + " | ".join(labels) + " |" in report and "| batch | B/N | " in report
    assert "## Pre-registered verdict" in report and "Holm" in report
    for batch in preset.batches:
        assert f"\n| {batch} | " in report
    with (quick.out / "results.csv").open() as f:
        results = list(csv.DictReader(f))
    assert {(r["optimizer"], int(r["batch"])) for r in results} == {(o, b) for o in labels for b in preset.batches}
    assert all(int(r["seeds"]) == len(preset.heldout_seeds(int(r["batch"])) or preset.seeds) for r in results)
    with (quick.out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == quick.total
    with (quick.out / "lr_search.csv").open() as f:
        assert sum(int(r["seeds"]) for r in csv.DictReader(f)) == sum(
            1 for r in quick.records if r["budget"] == "epochs" and analysis.phase_of(r) == "search")
    for name in PLOT_FILES:
        data = (quick.out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"({name})" in report
        image = matplotlib.image.imread(quick.out / name)
        assert image.shape[0] > 200 and image.shape[1] > 300


def _runs_csv(quick: QuickStudy) -> list[dict[str, str]]:
    with (quick.out / "runs.csv").open() as f:
        return list(csv.DictReader(f))


def _cells(quick: QuickStudy) -> list[analysis.Cell]:
    preset = PRESETS["quick"]
    return analysis.best_cells(quick.records, preset.lr_factors, preset.max_lr_extensions)


def test_a_narrowed_invocation_says_so_under_the_preset_description(quick: QuickStudy, tmp_path: Path) -> None:
    """--optimizers narrows what runs: the report says which part of the preset it covers right after the
    preset's description (which names every optimizer); the full report has no such line."""
    assert main([*_command(quick.out)[3:], "--no-progress", "--optimizers", "sgd,lars",
                 "--report-dir", str(tmp_path)]) == 0  # every run is in the cache: nothing trains
    narrowed = (tmp_path / "report.md").read_text()
    assert "This report covers part of the preset** (narrowed by --optimizers / --batches): sgd, lars at batch" \
        in narrowed
    assert "covers part of the preset" not in (quick.out / "report.md").read_text()


def test_every_cell_trains_every_seed_and_its_best_lr_is_the_best_mean(quick: QuickStudy) -> None:
    """The LR is chosen on the search seeds; the cell reports the held-out seeds (fresh ones) at that LR."""
    preset = PRESETS["quick"]
    all_rows = [r for r in _runs_csv(quick) if r["budget"] == "epochs"]
    rows = [r for r in all_rows if r["phase"] == "search"]
    for c in _cells(quick):
        fresh = [r for r in all_rows if r["phase"] == "heldout" and r["optimizer"] == c.optimizer
                 and int(r["batch"]) == c.batch]
        assert {int(r["seed"]) for r in fresh} == set(preset.heldout_seeds(c.batch))
        assert not {int(r["seed"]) for r in fresh} & set(preset.seeds)
        assert all(math.isclose(float(r["lr_factor"]), c.lr_factor, rel_tol=1e-3) for r in fresh)
        if fresh:
            assert c.heldout and sorted(c.top1_runs) == pytest.approx(sorted(float(r["top1"]) for r in fresh), abs=1e-4)
        mine = [r for r in rows if r["optimizer"] == c.optimizer and int(r["batch"]) == c.batch]
        by_factor: dict[float, list[float]] = {}
        for r in mine:
            by_factor.setdefault(float(r["lr_factor"]), []).append(float(r["top1"]))
        assert all(len(v) == len(preset.seeds) for v in by_factor.values())
        means = {f: sum(v) / len(v) for f, v in by_factor.items()}
        assert c.search_top1 == pytest.approx(max(means.values()), abs=1e-4)
        assert len(by_factor) == len(c.factors) == len(preset.lr_factors) + c.extensions
        assert c.lr_at_edge == any(math.isclose(c.lr_factor, f, rel_tol=1e-3) for f in (min(by_factor), max(by_factor)))
        # the search stops only inside the range or at its limit, and the report marks the latter
        assert not c.lr_at_edge or c.extensions == preset.max_lr_extensions
        assert c.edge_unresolved == c.lr_at_edge


def _oracle_limits(row: list[tuple[int, list[float]]], tolerance: float) -> tuple[int, int, int | None]:
    """Written apart from analysis.holding with SciPy's Welch interval: (certain limit, possible limit, first fall)."""
    peak_batch, peak = max(row, key=lambda bv: (sum(bv[1]) / len(bv[1]), -bv[0]))
    certain = possible = peak_batch
    falls, broken = None, False
    for b, values in sorted(row):
        if b <= peak_batch:
            continue
        ci = scipy_stats.ttest_ind(values, peak, equal_var=False).confidence_interval(0.95)
        above, below = ci.low > -tolerance, ci.high < -tolerance
        if below and falls is None:
            falls = b
        if not above:
            broken = True
        if not broken:
            certain = b
        if falls is None:
            possible = b
    return certain, possible, falls


@pytest.mark.filterwarnings("ignore:Precision loss occurred in moment calculation")  # SciPy on equal values
def test_summary_claims_follow_from_the_numbers(quick: QuickStudy) -> None:
    cells = _cells(quick)
    found = {f.name: f for f in summary.findings(quick.records, cells, TOLERANCE, "sgd")}
    table: dict[str, list[tuple[int, list[float]]]] = {}
    for c in cells:
        table.setdefault(c.optimizer, []).append((c.batch, list(c.top1_runs)))
    hold = analysis.holding(cells, TOLERANCE)
    for opt, row in table.items():
        certain, possible, falls = _oracle_limits(row, TOLERANCE)
        h = hold[opt]
        assert (h.holds_to, h.could_hold_to, h.falls_at) == (certain, possible, falls)
        assert f"{opt}: peak {100 * h.peak.estimate:.1f}%" in found["every_optimizer_falls"].sentence
    every = [hold[o].falls_at is not None for o in hold]
    assert found["every_optimizer_falls"].holds == (True if all(every) else (
        False if any(h.holds_to == h.largest_batch for h in hold.values()) else None))
    for opt in ("lars", "lamb"):
        f = found[f"{opt}_beyond_sgd"]
        a, b = hold[opt], hold["sgd"]
        expected = True if a.holds_to > b.could_hold_to else False if a.could_hold_to <= b.holds_to else None
        assert f.holds is expected
        assert ("does NOT" in f.sentence) == (expected is False)
        assert ("cannot be told apart" in f.sentence) == (expected is None)
    text = summary.summary_markdown(list(found.values()))
    shape = [found[n].holds for n in ("every_optimizer_falls", "lars_beyond_sgd", "lamb_beyond_sgd")]
    assert text.startswith("**The run shows the paper's shape**" if all(shape) else
                           "**The run does not show" if False in shape else "**Cannot tell whether")
    largest = max(PRESETS["quick"].batches)
    winner = max((c for c in cells if c.batch == largest), key=lambda c: c.top1.estimate)
    sentence = found["largest_batch_winner"].sentence
    assert f"best mean is {winner.optimizer}'s {100 * winner.top1.estimate:.1f}%" in sentence


def test_steps_to_target_match_history_and_perfect_scaling(quick: QuickStudy) -> None:
    target = PRESETS["quick"].target_accuracy
    by_key = {r["key"]: r for r in quick.records}
    for r in quick.records:
        evals = [(h["step"], h["top1"]) for h in r["result"]["history"] if h.get("top1") is not None]
        first = next((s for s, t in evals if t >= target), None)
        assert r["result"]["steps_to_target"] == first
    cells = _cells(quick)
    for c in cells:
        per_seed = [by_key[k]["result"]["steps_to_target"] for k in c.keys]
        assert c.reached == sum(s is not None for s in per_seed)
        assert c.steps_to_target == (None if None in per_seed else pytest.approx(sum(per_seed) / len(per_seed)))
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
    assert sorted((f.batch, f.seed) for f in fits if f.budget == "steps") == sorted(
        (b, s) for b in preset.diffusion_batches for s in preset.seeds)
    by_key = {(r["budget"], r["batch"], analysis.seed_of(r)): r for r in quick.records
              if r["optimizer"] == preset.diffusion_optimizer and r["lr_factor"] == 1.0
              and analysis.phase_of(r) == "search"}
    for f in fits:
        record = by_key[(f.budget, f.batch, f.seed)]
        assert f.final == analysis.curve(record, "w_dist")[-1][1] > 0
        if f.budget == "steps":
            assert f.steps == record["result"]["steps"] == preset.fixed_steps
        else:
            assert f.steps == round(preset.epochs * quick.meta_resume["train_size"] / f.batch)
    rows = analysis.diffusion_by_batch(fits)
    for row in rows:
        finals = [f.final for f in row.fits]
        assert len(finals) == len(preset.seeds) and row.final.estimate == pytest.approx(sum(finals) / len(finals))
        assert row.final.low <= min(finals) <= max(finals) <= row.final.high
    estimates = analysis.noise_scale(quick.records)
    assert estimates and all(math.isfinite(e.b_simple) and e.b_simple > 0 for e in estimates)
    assert {(e.optimizer, e.batch, e.seed) for e in estimates} == {
        (r["optimizer"], r["batch"], analysis.seed_of(r)) for r in quick.records
        if r["budget"] == "epochs" and r["lr_factor"] == 1.0 and r["optimizer"] == preset.diffusion_optimizer
        and analysis.phase_of(r) == "search"}
    # B_simple is measured where it is read, only
    assert not any(analysis.curve(r, "b_simple") for r in quick.records
                   if r["lr_factor"] != 1.0 or r["optimizer"] != preset.diffusion_optimizer)
    critical = analysis.predicted_critical_batch(estimates)
    sentence = next(f.sentence for f in summary.findings(quick.records, _cells(quick), TOLERANCE, "sgd")
                    if f.name == "noise_scale")
    assert f"{critical.median:.0f} (quartiles {critical.q1:.0f}–{critical.q3:.0f})" in sentence


def test_progress_is_one_line_and_results_print_as_percentages(quick: QuickStudy) -> None:
    lines = [line for line in quick.stderr.replace("\r", "\n").splitlines() if line.startswith("study quick: runs")]
    assert lines and lines[-1].startswith(f"study quick: runs {quick.total}/{quick.total}")
    assert "100%" in lines[-1]
    assert "top1=" not in quick.stdout and "\n| 64 | " in quick.stdout and "% ± " in quick.stdout


def test_each_run_has_a_tensorboard_view_under_its_key(quick: QuickStudy) -> None:
    """OUT/tensorboard/<key>: one folder per run trained (before or after the kill), whose event files
    hold the run's metrics as its cache record has them (the killed run's purged and rewritten)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = quick.out / "tensorboard"
    assert sorted(d.name for d in board.iterdir()) == sorted(r["key"] for r in quick.records)
    for record in quick.records[:4]:
        events = EventAccumulator(str(board / record["key"]), size_guidance={"scalars": 0})
        events.Reload()
        history = record["result"]["history"]
        assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
            [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in history]


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


def test_device_batch_accumulates_on_a_cpu_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--device-batch on a CPU preset plans the same runs with accumulation over fixed micro-batches (and
    BatchNorm over them); only a multi-GPU preset turns a plain invocation into a printed torchrun plan."""
    assert main(["--preset", "quick", "--out", str(tmp_path), "--device-batch", "32", "--plan"]) == 0
    text = capsys.readouterr().out
    assert "--global-batch 512 " in text and "--global-batch 64 " in text
    assert "--device-batch 32" in text and "--device-batch 64" not in text
    assert not PRESETS["quick"].multi_gpu and PRESETS["imagenet"].multi_gpu


@pytest.mark.parametrize(("argv", "match"), [
    (["--optimizers", "adam"], "no optimizer 'adam'"),
    (["--batches", "16,x"], "--batches"),
    (["--tolerance", "-1"], None),
    (["--seeds", "0"], "--seeds"),
    (["--confidence", "1.5"], "--confidence"),
    (["--max-lr-extensions", "-1"], "--max-lr-extensions"),
    (["--device-batch", "0"], "--device-batch"),
])
def test_bad_arguments_exit_with_a_clear_message(argv: list[str], match: str | None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "quick", "--out", str(tmp_path), *argv])
    message = f"{exc.value.code} {capsys.readouterr().err}"
    assert (match or "--tolerance") in message
    assert not (tmp_path / "cache").exists()
