"""`python -m benchmarks` at a tiny size: every usable backend and the requested peers measured or
skipped with a reason, the files written, flag errors named; the issues' targets evaluated on rows."""

from __future__ import annotations

import json

import pytest
import torch

import fastlars
from benchmarks.__main__ import main
from benchmarks.suite import markdown
from benchmarks.targets import ADAMW, SGD, evaluate


def test_cli_tiny_run_writes_every_backend_and_peer(tmp_path, capsys) -> None:
    assert main(["--device", "cpu", "--params", "tiny", "--repeat", "3", "--peers", "timm,torch_fused,apex",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "apex: not measured:" in printed  # a peer that cannot run says why, never silently
    (json_path,) = tmp_path.glob("step_cpu_*.json")
    result = json.loads(json_path.read_text())
    assert result["machine"]["device_type"] == "cpu" and result["machine"]["commit"]
    assert result["copy_bandwidth_gbs"] > 0 and "apex" in result["not_measured"]
    measured = {(r["optim"], r["implementation"]) for r in result["rows"] if not r["skipped"]}
    usable = fastlars.available_backends(torch.device("cpu"))
    expected = {(o, f"fastlars.{b}") for o in ("lamb", "lars") for b in usable}
    expected |= {("lamb", "timm.Lamb"), ("lars", "timm.Lars"), ("lamb", ADAMW), ("lars", SGD)}
    assert measured == expected
    per_elem = {"lamb": 28, "lars": 20}
    for r in result["rows"]:
        assert r["compulsory_bytes"] == per_elem[r["optim"]] * 19_210  # the tiny set, fp32
        assert r["ms_min"] <= r["ms_median"] <= r["ms_max"]
    assert (json_path.with_suffix(".png")).stat().st_size > 0
    table = json_path.with_suffix(".md").read_text()
    assert "| fastlars.native |" in table and "speed-up over" in table and "copy bandwidth" in table


@pytest.mark.parametrize("flags,message", [(["--params", "resnet51"], "--params: unknown"),
                                           (["--optim", "adam"], "--optim: unknown"),
                                           (["--backends", "warp"], "--backends: unknown"),
                                           (["--repeat", "1"], "--repeat: at least 3"),
                                           (["--share", "--share-batches", "1,x"], "--share-batches")])
def test_cli_flag_errors_name_the_flag(flags, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _row(optim: str, implementation: str, ms: float, peer: bool = True) -> dict:
    return {"param_set": "resnet50", "dtype": "fp32", "optim": optim, "implementation": implementation, "peer": peer,
            "ms_median": ms, "ms_min": ms, "ms_max": ms, "compulsory_bytes": 1, "gb_per_s": 1.0,
            "fraction_of_copy": 0.5, "skipped": None}


def test_cpu_targets_are_ratios_of_the_medians() -> None:
    rows = [_row("lamb", "fastlars.native", 10.0, peer=False), _row("lamb", ADAMW, 9.0),
            _row("lamb", "timm.Lamb", 50.0), _row("lars", "fastlars.native", 8.0, peer=False), _row("lars", SGD, 8.5)]
    result = {"machine": {"device_type": "cpu", "device": "x", "cpus": 2, "threads": 2, "torch": "t",
                          "fastlars": "f", "commit": "c" * 10, "date_utc": "d"},
              "copy_bandwidth_gbs": 2.0, "repeats": 3, "rows": rows}
    got = {e["label"]: (round(e["value"], 4), e["met"]) for e in evaluate(result)}
    assert got == {"resnet50 fp32: LAMB native / AdamW(fused) step time": (round(10 / 9, 4), True),
                   "resnet50 fp32: timm Lamb / LAMB native step time": (5.0, False),
                   "resnet50 fp32: LARS native / AdamW(fused) step time": (round(8 / 9, 4), True),
                   "resnet50 fp32: LARS native / SGD(fused) step time": (round(8 / 8.5, 4), True)}
    text = markdown(result)
    assert "| fastlars.native | 0.90× | 5.00× |" in text  # speed-up = peer median / ours
    assert "| resnet50 fp32: timm Lamb / LAMB native step time | 5.00 | >= 6.0 | no |" in text


def test_cli_share_writes_table_json_and_plot(tmp_path, capsys) -> None:
    """--share at one tiny batch: one row per (optim, implementation), shares in (0, 1), files written."""
    assert main(["--device", "cpu", "--share", "--share-batches", "1", "--image-size", "64", "--repeat", "3",
                 "--backends", "native", "--optim", "lars", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("share_cpu_*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["batch"], r["optim"], r["implementation"]) for r in rows] == [
        (1, "lars", "fastlars.native"), (1, "lars", "timm.Lars"), (1, "lars", "torch.SGD(fused, momentum)")]
    for r in rows:
        assert 0 < r["share"] < 1
        assert r["share"] == pytest.approx(r["step_ms"] / (r["step_ms"] + r["forward_backward_ms"]))
    assert next(tmp_path.glob("share_lars_cpu_*.png")).stat().st_size > 0
    assert "| 1 |" in capsys.readouterr().out
