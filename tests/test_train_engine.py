"""The trainer end to end on CPU: the bundled-data run, DDP / ZeRO / FSDP2 with gloo equal to one
process, SIGKILL then --resume equal to an uninterrupted run (fp32 and int8 LAMB state; one process, and
two under ZeRO and FSDP2, whose ranks each write a shard), and clear errors for bad inputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = ["--data", "default", "--loader", "cpu", "--workers", "0", "--device", "cpu", "--quiet",
             "--optimizer", "lamb", "--global-batch", "64", "--lr", "0.02", "--warmup-epochs", "0.2",
             "--epochs", "1", "--max-steps", "12"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("data-cache")
    return {**os.environ, "FASTLARS_DATA_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_train(args: list[str], env: dict[str, str], nproc: int = 1,
              timeout: float = 300) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(29500 + os.getpid() % 1000), "-m", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final_model.pt", map_location="cpu")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert params and set(a) == set(b)
    for k in params:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_default_data_one_epoch_within_two_minutes(env: dict[str, str], tmp_path: Path) -> None:
    start = time.monotonic()
    done = run_train(["--data", "default", "--epochs", "1", "--out", str(tmp_path), "--quiet", "--device", "cpu"],
                     env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 120
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 6 and result["epochs"] == 1.0  # ⌈1,437 / 256⌉ updates
    assert 0.0 < result["optimizer_share"] < 1.0 and result["images_per_s"] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["top1"] == result["top1"]


def test_tensorboard_view_holds_the_metrics(env: dict[str, str], tmp_path: Path) -> None:
    """`python -m train --data default --epochs 1 --tensorboard runs/tb`: TensorBoard's own reader finds
    every metrics.jsonl scalar at its step, and the per-layer trust ratios as a histogram per record."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.tensorboard import SCALARS, TRUST_RATIO_HISTOGRAM, TRUST_RATIO_PREFIX

    done = subprocess.run([sys.executable, "-m", "train", "--data", "default", "--epochs", "1", "--tensorboard",
                           "runs/tb", "--out", "runs/run", "--quiet", "--device", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "runs" / "run" / "tensorboard").exists()
    records = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "runs" / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    for field, tag in SCALARS.items():
        logged = [(r["step"], r[field]) for r in records if r.get(field) is not None]
        assert logged, f"metrics.jsonl has no {field}"
        read = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in logged], tag
        for (_, value), (_, expected) in zip(read, logged):
            assert value == pytest.approx(expected, rel=1e-6), tag  # TensorBoard stores float32
    histograms = events.Histograms(TRUST_RATIO_HISTOGRAM)
    assert [h.step for h in histograms] == [r["step"] for r in records]
    for h, r in zip(histograms, records):
        ratios = list(r["trust_ratios"].values())
        assert sorted(r["trust_ratios"]) == ["0.weight", "3.weight", "8.weight"]
        assert h.histogram_value.num == len(ratios)
        assert (h.histogram_value.min, h.histogram_value.max) == pytest.approx((min(ratios), max(ratios)))
    layer = [(e.step, e.value) for e in events.Scalars(TRUST_RATIO_PREFIX + "3.weight")]
    assert layer == [(r["step"], pytest.approx(r["trust_ratios"]["3.weight"], rel=1e-6)) for r in records]


def test_tensorboard_on_by_default_or_a_one_line_note(env: dict[str, str], tmp_path: Path, monkeypatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Without --tensorboard: event files in OUT/tensorboard when the package is installed; without it, one
    line saying TensorBoard logging is off and the run goes on."""
    pytest.importorskip("tensorboard")
    from train import tensorboard
    from train.config import TrainConfig
    from train.engine import train

    monkeypatch.setenv("FASTLARS_DATA_CACHE", env["FASTLARS_DATA_CACHE"])
    cfg = TrainConfig(data="default", loader="cpu", workers=0, device="cpu", optimizer="lars", global_batch=256,
                      epochs=1, max_steps=1, track_diffusion=False, noise_scale=False)
    train(TrainConfig(**{**cfg.as_dict(), "out": str(tmp_path / "on")}))
    assert list((tmp_path / "on" / "tensorboard").glob("events.out.tfevents.*"))
    assert tensorboard.NOT_INSTALLED not in capsys.readouterr().out
    monkeypatch.setattr(tensorboard, "installed", lambda: False)
    assert train(TrainConfig(**{**cfg.as_dict(), "out": str(tmp_path / "off")})).steps == 1
    assert capsys.readouterr().out.count(tensorboard.NOT_INSTALLED) == 1
    assert not (tmp_path / "off" / "tensorboard").exists()


@pytest.mark.parametrize("shard", ["none", "zero", "fsdp2"])
def test_two_processes_equal_one(env: dict[str, str], tmp_path: Path, shard: str) -> None:
    """Global batch 64 as 2 ranks × 32 equals 1 process × 32 × 2 accumulation steps: same micro-batches,
    same BN batches, mean gradient over the same 64 images."""
    single = run_train([*SMALL_RUN, "--device-batch", "32", "--out", str(tmp_path / "one")], env)
    assert single.returncode == 0, single.stderr
    double = run_train([*SMALL_RUN, "--device-batch", "32", "--shard", shard, "--out", str(tmp_path / "two")],
                       env, nproc=2)
    assert double.returncode == 0, double.stderr
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), atol=2e-5)
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (one["steps"], two["steps"], one["accumulation_steps"], two["world_size"]) == (12, 12, 2, 2)


TEARDOWN_PROBE = """
import gc, os, sys
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
from train.cli import config_from_args
from train.engine import train

gc.disable()  # what a rank sees when no collection happens to run between train() and exit
train(config_from_args(sys.argv[1:]))
alive = sum(isinstance(o, FSDPParamGroup) for o in gc.get_objects())
print(f"rank {os.environ['RANK']}: {alive} FSDP parameter groups alive after train()", flush=True)
"""


def test_fsdp2_frees_what_holds_the_process_group_before_destroying_it(env: dict[str, str], tmp_path: Path) -> None:
    """FSDP2's parameter groups keep the process group in reference cycles; train() frees them before
    destroy_process_group, so gloo's teardown never runs during interpreter shutdown (where it aborted a
    rank once: "terminate called without an active exception"), even with the collector off."""
    script = tmp_path / "probe.py"
    script.write_text(TEARDOWN_PROBE)
    args = [*SMALL_RUN, "--max-steps", "2", "--device-batch", "32", "--shard", "fsdp2", "--out", str(tmp_path / "o")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29500 + os.getpid() % 1000), str(script), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # torchrun relays both workers' stdout into one pipe, where one rank's line may land inside the other's
    reports = re.findall(r"rank (\d+): (\d+) FSDP parameter groups alive after train\(\)", done.stdout)
    assert sorted(reports) == [("0", "0"), ("1", "0")], done.stdout


def _descendants(pid: int) -> list[int]:
    """Ids of the processes below ``pid`` (read from /proc): torchrun starts its workers in sessions of their
    own, so killing its process group leaves them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every process of ``pids`` has exited (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in pids if _running(pid)]:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("shard,state", [("none", "fp32"), ("none", "int8"), ("zero", "int8"), ("fsdp2", "fp32")])
def test_sigkill_then_resume_equals_uninterrupted(env: dict[str, str], tmp_path: Path, shard: str,
                                                  state: str) -> None:
    """LAMB killed mid-run and resumed with --resume ends bit-identical to the uninterrupted run, with fp32
    state and with int8 state on every adapting weight (--optim-state-min-size 0: the codes, block scales
    and format records go through checkpoint.pt); under ZeRO and FSDP2 with two processes killed together
    (FSDP2: each rank's slices of the params and optimizer state in its shard file)."""
    nproc = 1 if shard == "none" else 2
    args = [*SMALL_RUN, "--device-batch", "16", "--max-steps", "16", "--checkpoint-every", "2", "--shard", shard]
    if state != "fp32":
        args += ["--optim-state", state, "--optim-state-min-size", "0"]
    whole = run_train([*args, "--out", str(tmp_path / "whole")], env, nproc=nproc)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    launcher = [sys.executable, "-m", "train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
        str(29500 + os.getpid() % 1000), "-m", "train"]
    proc = subprocess.Popen([*launcher, *args, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        ckpt = out / "checkpoint.pt"
        if ckpt.exists():
            try:
                t = torch.load(ckpt, map_location="cpu", weights_only=False)["progress"]["t"]
            except Exception:
                t = 0
            if t >= 6:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    workers = _descendants(proc.pid)
    for pid in [*workers, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert _gone(workers), "a worker outlived the kill and would go on writing the checkpoint"
    killed_at = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["progress"]["t"]
    assert 6 <= killed_at < 16
    if state == "int8":
        saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]
        assert sum(any(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in entry.values())
                   for entry in saved.values()) == 3  # the three adapting weights of the small CNN
    if shard == "fsdp2":
        assert [f.name for f in sorted((out / "checkpoint.shards").glob("*/*"))] == ["rank0.pt", "rank1.pt"]
    resumed = run_train([*args, "--out", str(out), "--resume"], env, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(out), atol=0)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 16


def make_folder(root: Path, classes: dict[str, int], image: bytes | None = None) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                if image is None:
                    Image.new("RGB", (8, 8), (i * 20 % 255, 40, 90)).save(folder / f"{i}.jpg")
                else:
                    (folder / f"{i}.jpg").write_bytes(image)
    return root


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "--data"),
    ("empty_class", "no images"),
    ("corrupt", "b/0.jpg"),
    ("indivisible", "--global-batch 30 is not a multiple"),
    ("model", "--model"),
])
def test_bad_inputs_exit_with_a_clear_error(env: dict[str, str], tmp_path: Path, case: str, message: str) -> None:
    args = ["--loader", "cpu", "--workers", "0", "--device", "cpu", "--quiet", "--epochs", "1", "--out",
            str(tmp_path / "out"), "--image-size", "8"]
    data = tmp_path / "data"
    if case == "missing":
        args += ["--data", str(tmp_path / "nowhere")]
    elif case == "empty_class":
        make_folder(data, {"a": 4, "b": 0})
        args += ["--data", str(data)]
    elif case == "corrupt":
        make_folder(data, {"a": 4})
        make_folder(tmp_path / "bad", {"b": 1}, image=b"\xff\xd8\xff\xe0 not really a jpeg")
        for split in ("train", "val"):
            (tmp_path / "bad" / split / "b").rename(data / split / "b")
        args += ["--data", str(data), "--global-batch", "5"]
    elif case == "indivisible":
        args += ["--data", "default", "--global-batch", "30", "--device-batch", "8"]
    else:
        args += ["--data", "default", "--model", "alexnet"]
    done = run_train(args, env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_train(env: dict[str, str], tmp_path: Path, amp: str) -> None:
    """Autocast in bf16, or fp16 with a GradScaler whose unscale and overflow skip run in fastlars'
    step; NHWC images and model: the run learns (well above the 10% of chance) and stays finite."""
    done = run_train(["--data", "default", "--loader", "cpu", "--workers", "0", "--device", "cpu", "--quiet",
                      "--optimizer", "lamb", "--global-batch", "64", "--lr", "0.05", "--warmup-epochs", "0.5",
                      "--epochs", "2", "--amp", amp, "--channels-last", "--out", str(tmp_path)], env)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["top1"] > 0.3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in records)


def test_resume_checks_the_state_format(env: dict[str, str], tmp_path: Path, monkeypatch) -> None:
    """--resume refuses a checkpoint written with another --optim-state (naming the field), and takes one
    written before the field existed as fp32 (the default then)."""
    from train import checkpoint
    from train.config import TrainConfig
    from train.engine import train

    monkeypatch.setenv("FASTLARS_DATA_CACHE", env["FASTLARS_DATA_CACHE"])
    cfg = TrainConfig(data="default", loader="cpu", workers=0, device="cpu", quiet=True, optimizer="lamb",
                      global_batch=256, lr=0.02, epochs=1, max_steps=2, checkpoint_every=1, out=str(tmp_path),
                      tensorboard="off", track_diffusion=False, noise_scale=False)
    train(cfg)
    with pytest.raises(ValueError, match="different optim_state"):
        train(TrainConfig(**{**cfg.as_dict(), "resume": True, "optim_state": "int8"}))
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    for name in ("optim_state", "optim_state_min_size"):
        del state["config"][name]
    checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    assert train(TrainConfig(**{**cfg.as_dict(), "resume": True})).steps == 2
