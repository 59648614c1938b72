"""`python -m benchmarks` at a tiny size: every usable backend and the requested peers measured or
skipped with a reason, the files written, flag errors named; the issues' targets evaluated on rows."""

from __future__ import annotations

import json

import pytest
import torch

import fastlars
from benchmarks.__main__ import main
from benchmarks.cases import UNCHECKED_SUFFIX, Case, fastlars_case, unchecked, with_grad_scaler
from benchmarks.measure import roofline_fraction
from benchmarks.suite import apply_rooflines, host_overhead_markdown, markdown, merge_rooflines, thread_counts
from benchmarks.targets import ADAMW, COMPILED, SGD, evaluate


def test_cli_tiny_run_writes_every_backend_and_peer(tmp_path, capsys) -> None:
    assert main(["--device", "cpu", "--params", "tiny", "--repeat", "3", "--peers", "timm,torch_fused,apex",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "apex: not measured:" in printed  # a peer that cannot run says why, never silently
    (json_path,) = tmp_path.glob("step_cpu_*.json")
    result = json.loads(json_path.read_text())
    assert result["machine"]["device_type"] == "cpu" and result["machine"]["commit"]
    # which vector ISA the CPU has and which kernel build ran are recorded with every figure
    assert result["machine"]["cpu_vector_isa"] in {"avx512", "avx2", "none", "unknown"}
    native_built = fastlars.backends.unavailable_reason("native", torch.device("cpu")) is None
    assert result["machine"]["kernel_isa"] in ({"avx512", "avx2", "baseline"} if native_built else {"not built"})
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
    assert f"{result['machine']['kernel_isa']} kernels" in table.splitlines()[0]
    # default on the CPU: every case on all threads and on 1; CPU/wall recorded; the roofline probed per count
    counts = sorted({torch.get_num_threads(), 1}, reverse=True)
    assert result["thread_counts"] == counts
    assert {r["threads"] for r in result["rows"]} == set(counts)
    assert all(r["cpu_over_wall"] > 0 for r in result["rows"] if not r["skipped"])
    for n in counts:
        mixes = result["rooflines_gbs"][str(n)]
        assert set(mixes) >= {"read", "update", "update2", "torch_inplace", "torch_fused_sgd", "torch_fused_adamw",
                              "best"}
        assert mixes["best"] == max(v for k, v in mixes.items() if k != "best") > 0
    # the tiny set fits in cache: no roofline fraction, listed as host overhead instead
    assert all(r["fraction_of_roofline"] is None for r in result["rows"]) and result["over_roofline"] == []
    assert "Host overhead" in table
    assert ("Thread scaling" in table) == (len(counts) > 1)


@pytest.mark.parametrize("flags,message", [(["--params", "resnet51"], "--params: unknown"),
                                           (["--optim", "adam"], "--optim: unknown"),
                                           (["--backends", "warp"], "--backends: unknown"),
                                           (["--repeat", "1"], "--repeat: at least 3"),
                                           (["--threads", "0"], "--threads"),
                                           (["--grad-scaler", "yes"], "--grad-scaler: unknown"),
                                           (["--skip-nonfinite", "no"], "--skip-nonfinite: unknown"),
                                           (["--threads", "two"], "--threads"),
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
                   "resnet50 fp32: LARS native / SGD(fused) step time": (round(8 / 8.5, 4), True),
                   "resnet50 fp32: LARS native / SGD(fused) step time (21)": (round(8 / 8.5, 4), True),
                   "resnet50 fp32: LAMB native / AdamW(fused) step time (21)": (round(10 / 9, 4), True)}
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


def test_thread_counts_largest_first() -> None:
    full = torch.get_num_threads()
    assert thread_counts(None, torch.device("cpu")) == sorted({full, 1}, reverse=True)
    assert thread_counts("1,all,1", torch.device("cpu")) == sorted({full, 1}, reverse=True)
    assert thread_counts(None, torch.device("cuda")) == [full]


def _big_row(implementation: str, threads: int, gb_per_s: float, nbytes: int = 10**9, optim: str = "lars",
             ms: float = 10.0, cpu_over_wall: float = 1.9, peer: bool = True) -> dict:
    return {"param_set": "resnet50", "dtype": "fp32", "optim": optim, "implementation": implementation, "peer": peer,
            "ms_median": ms, "ms_min": ms, "ms_max": ms, "compulsory_bytes": nbytes, "gb_per_s": gb_per_s,
            "fraction_of_copy": 0.5, "fraction_of_inplace": 0.5, "repeats": 5, "skipped": None, "threads": threads,
            "cpu_over_wall": cpu_over_wall, "fraction_of_roofline": None}


def test_roofline_is_the_best_mix_and_rows_above_it_are_reported_not_capped() -> None:
    start = {"2": {"read": 40.0, "update": 45.0, "update2": 30.0, "torch_inplace": 44.0}, "1": {"read": 20.0}}
    end = {"2": {"read": 38.0, "update": 50.0, "update2": 31.0, "torch_inplace": 20.0}, "1": {"read": 25.0}}
    roofs = merge_rooflines(start, end)
    assert roofs["2"] == {"read": 40.0, "update": 50.0, "update2": 31.0, "torch_inplace": 44.0, "best": 50.0}
    assert roofs["1"]["best"] == 25.0
    rows = [_big_row("fastlars.native", 2, 40.0, peer=False), _big_row(SGD, 2, 55.0),
            _big_row("fastlars.native", 1, 20.0, peer=False), _big_row(SGD, 1, 10.0),
            _big_row("fastlars.native", 2, 40.0, nbytes=1000, peer=False) | {"param_set": "small_cnn"}]
    result = {"machine": {"device_type": "cpu", "device": "x", "cpus": 2, "threads": 2, "torch": "t",
                          "fastlars": "f", "commit": "c" * 10, "date_utc": "d"},
              "copy_bandwidth_gbs": 2.0, "inplace_bandwidth_gbs": 3.0, "repeats": 5, "rows": rows,
              "rooflines_gbs": roofs, "last_level_cache_bytes": 32 << 20, "thread_counts": [2, 1]}
    apply_rooflines(result)
    assert [r["fraction_of_roofline"] for r in rows] == [0.8, 1.1, 0.8, 0.4, None]
    assert result["over_roofline"] == [f"resnet50 fp32 lars {SGD} on 2 thread(s): 110%"]
    text = markdown(result)
    assert "Rows above the roofline" in text and "| 110% |" in text  # shown as measured, never capped
    assert "Thread scaling: 1 vs 2 threads" in text
    assert "| resnet50 | LARS | fastlars.native | 10.00 | 10.00 | 1.00× | 1.90 | 1.90 | 80% | 80% |" in text
    assert "Host overhead" in text and "| fastlars.native | 10000 |" in text  # µs per step of the small set
    assert roofline_fraction(10.0, None, False) is None and roofline_fraction(10.0, 20.0, False) == 0.5
    assert roofline_fraction(10.0, 20.0, True) is None  # a host-overhead set


def test_a_large_shared_cache_does_not_make_a_model_a_host_overhead_set() -> None:
    """A VM may report its host's whole L3 (480 MiB on a 2-core Xeon VM): ResNet-50's rows still get their % of
    roofline and stay out of the host-overhead table, which lists the host-overhead sets only."""
    rows = [_big_row("fastlars.native", 2, 40.0, nbytes=614 << 20, peer=False),
            _big_row("fastlars.native", 2, 1.0, nbytes=200_000, peer=False) | {"param_set": "small_cnn"}]
    result = {"machine": {"device_type": "cpu", "device": "x", "cpus": 2, "threads": 2, "torch": "t",
                          "fastlars": "f", "commit": "c" * 10, "date_utc": "d"},
              "copy_bandwidth_gbs": 2.0, "inplace_bandwidth_gbs": 3.0, "repeats": 5, "rows": rows,
              "rooflines_gbs": {"2": {"read": 50.0, "best": 50.0}}, "last_level_cache_bytes": 480 << 20,
              "thread_counts": [2]}
    apply_rooflines(result)
    assert [r["fraction_of_roofline"] for r in rows] == [pytest.approx(0.8), None]
    host = "\n".join(host_overhead_markdown(result))
    assert "small_cnn fp32 LARS" in host and "resnet50" not in host


def test_issue21_targets_use_the_full_thread_count() -> None:
    rows = [_big_row("fastlars.native", 2, 1.0, ms=16.0, peer=False), _big_row(COMPILED, 2, 1.0, ms=20.0),
            _big_row(SGD, 2, 1.0, ms=14.0), _big_row("fastlars.native", 1, 1.0, ms=30.0, peer=False),
            _big_row(SGD, 1, 1.0, ms=28.0), _big_row("fastlars.native", 2, 1.0, ms=22.0, optim="lamb", peer=False),
            _big_row(ADAMW, 2, 1.0, ms=15.0, optim="lamb", cpu_over_wall=1.5)]
    result = {"machine": {"device_type": "cpu"}, "rows": rows, "thread_counts": [2, 1]}
    got = {e["label"]: (round(e["value"], 4), e["met"]) for e in evaluate(result)}
    assert got["resnet50 fp32: LARS native / compiled reference step time"] == (0.8, True)
    assert got["resnet50 fp32: LARS native / SGD(fused) step time (21)"] == (round(16 / 14, 4), True)
    assert got["resnet50 fp32: LAMB native / AdamW(fused) step time (21)"] == (round(22 / 15, 4), True)
    assert got["resnet50 fp32: LARS native CPU/wall"] == (1.9, True)
    assert "bert_base fp32: LARS native CPU/wall" not in got  # no bert_base rows measured


# ---------------------------------------------------------------------------------- low-precision peers
TINY_BIG, TINY_SMALL = 18_432, 778  # the tiny set: one 64×288 conv weight (72 blocks of 256), 778 elements below 4096
LOWBIT_BYTES = {  # read w, g and each state buffer, write w and the buffers (benchmarks.cases.lowbit_peer_cases)
    ("lamb", "bitsandbytes"): TINY_BIG * (4 + 4 + 4 + 2 * 2) + 2 * 2 * 72 * 4 + TINY_SMALL * 28,  # int8 m, v + scales
    ("lars", "bitsandbytes"): TINY_BIG * (4 + 4 + 4 + 2) + 2 * 72 * 4 + TINY_SMALL * 20,
    ("lamb", "torchao"): TINY_BIG * (4 + 4 + 4 + 2 * 2) + 2 * 2 * 72 * 4 + TINY_SMALL * 28,
    ("lamb", "optimi"): (TINY_BIG + TINY_SMALL) * 2 * 9,  # bf16 w (r+w), g, m, v, compensation (r+w)
    ("lars", "optimi"): (TINY_BIG + TINY_SMALL) * 2 * 7,  # bf16 w (r+w), g, momentum, compensation (r+w)
}
INSTALL = {"bitsandbytes": "pip install bitsandbytes", "torchao": "pip install torchao",
           "optimi": "pip install torch-optimi"}


@pytest.mark.parametrize("algorithm,peer", list(LOWBIT_BYTES))
def test_lowbit_peer_case_builds_steps_and_counts_its_own_bytes(algorithm: str, peer: str) -> None:
    """Each low-precision peer builds, steps the tiny set once (optimi on bf16 weights, the others on fp32)
    and counts the bytes of the state it holds: 8-bit codes and block scales where it quantises (a fp32
    count would fail here), full-precision state below 4096 elements."""
    from benchmarks.cases import PEER_MODULES, lowbit_peer_cases
    from benchmarks.params import PARAM_SETS, make_params

    pytest.importorskip(PEER_MODULES[peer], reason=f"{peer} is not installed ({INSTALL[peer]})")
    dtype = torch.bfloat16 if peer == "optimi" else torch.float32
    params = make_params(PARAM_SETS["tiny"].shapes(), dtype, "cpu")
    before = [p.detach().clone() for p in params]
    (case,) = lowbit_peer_cases(algorithm, (peer,))
    assert case.peer and case.implementation.split(".")[0] == peer
    # torchao compiles its step per shape (a minute on 2 cores); eager runs the same function
    with torch.compiler.set_stance("force_eager"):
        step, nbytes = case.factory(params, False)
        step()
    assert all(torch.isfinite(p).all() for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert nbytes() == LOWBIT_BYTES[(algorithm, peer)]


def test_lowbit_peers_say_what_runs_and_are_reported_when_missing(monkeypatch) -> None:
    from benchmarks import cases

    labels = {c.implementation for a in ("lamb", "lars") for c in cases.lowbit_peer_cases(a, cases.PEERS)}
    installed = {peer for peer in ("bitsandbytes", "torchao", "optimi") if not cases.unavailable_peers(
        torch.device("cpu"), (peer,))}
    if "bitsandbytes" in installed:
        assert any("LAMB8bit = 8-bit AdamW, no trust ratio" in label for label in labels)
        assert any("LARS8bit = 8-bit SGD-momentum, no trust ratio" in label for label in labels)
    monkeypatch.setitem(cases.PEER_MODULES, "torchao", "torchao_not_a_module")
    assert cases.unavailable_peers(torch.device("cpu"), ("torchao",))["torchao"].startswith("not importable")
    assert cases.unavailable_peers(torch.device("cpu"), ("timm",)).keys() <= {"timm"}


# ---------------------------------------------------------------------------------- --state rows (issue 22)
@pytest.mark.parametrize("algorithm", ["lamb", "lars"])
def test_fastlars_int8_state_rows_count_their_own_bytes(algorithm: str) -> None:
    """'fastlars.native [int8 state]' steps the tiny set and counts codes and block scales (the rule of the
    low-precision peers), full-precision state below 4096 elements. fastlars blocks along rows: the 64×288
    weight has 64 rows of 256 + 32, so 128 scales per buffer where a flat layout has 72."""
    if fastlars.backends.low_precision_unavailable_reason("native", torch.device("cpu")) is not None:
        pytest.skip("the native low-precision CPU kernels are not built")
    from benchmarks.cases import fastlars_case
    from benchmarks.params import PARAM_SETS, make_params

    params = make_params(PARAM_SETS["tiny"].shapes(), torch.float32, "cpu")
    case = fastlars_case(algorithm, "native", "int8")
    assert case.implementation == "fastlars.native [int8 state]" and not case.peer
    step, nbytes = case.factory(params, False)
    step()
    buffers = 2 if algorithm == "lamb" else 1
    assert nbytes() == TINY_BIG * (4 + 4 + 4 + 2 * buffers) + 2 * buffers * 128 * 4 + TINY_SMALL * (12 + 8 * buffers)


def test_int8_state_target_is_the_ratio_to_the_fp32_native_step() -> None:
    rows = [_big_row("fastlars.native", 2, 1.0, ms=20.0, optim="lamb", peer=False),
            _big_row("fastlars.native [int8 state]", 2, 1.0, ms=12.0, optim="lamb", peer=False)]
    result = {"machine": {"device_type": "cpu"}, "rows": rows, "thread_counts": [2]}
    got = {e["label"]: (round(e["value"], 4), e["met"]) for e in evaluate(result)}
    assert got["resnet50 fp32: LAMB native int8 / fp32 native step time"] == (0.6, True)
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--state", "int4"])


def test_compiled_reference_case_compiles_each_case_past_the_recompile_limit(monkeypatch) -> None:
    """Every compiled-reference row is a compiled step: with a recompile limit of 1, the third case's step
    is still compiled (not run eagerly by dynamo, as it was past the limit before each case reset it)."""
    from torch._dynamo.testing import CompileCounter

    from benchmarks.cases import compiled_reference_case
    from benchmarks.params import PARAM_SETS, make_params

    counter = CompileCounter()  # dynamo's tracing without inductor: seconds, not minutes
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counter))
    frames = []
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(3):
            params = make_params(PARAM_SETS["tiny"].shapes(), torch.float32, "cpu")
            step, _ = compiled_reference_case("lars").factory(params, False)
            before = counter.frame_count
            step()
            frames.append(counter.frame_count - before)
    assert all(f >= 1 for f in frames), frames


@pytest.mark.skipif(fastlars.backends.unavailable_reason("native", torch.device("cpu")) is not None,
                    reason="the native CPU backend is not built")
def test_lars_passes_times_every_pass_and_writes_json(tmp_path, capsys) -> None:
    """benchmarks.lars_passes on the tiny set: every pass timed on one set of tensors, the ratios derived."""
    from benchmarks.lars_passes import CASES, main

    out = tmp_path / "passes.json"
    assert main(["--params", "tiny", "--rounds", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == set(CASES) and all(v > 0 for v in result["median_ms"].values())
    assert result["threads"] == torch.get_num_threads() and len(result["loadavg_start"]) == 3
    d = result["derived"]
    assert d["step_over_sgd"] == pytest.approx(result["median_ms"]["step"] / result["median_ms"]["fused_sgd"])
    assert "||w|| passes" in capsys.readouterr().out


def test_time_rounds_interleaves_every_function_with_a_rotated_order() -> None:
    """Side-by-side timing: each function gets its own number of calls, spread over the rounds, and every
    round times all of them, starting from a different one each time (so a slow minute of the machine falls
    on all of them alike)."""
    from benchmarks.measure import time_rounds

    calls: list[str] = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    timings = time_rounds(fns, [6, 3, 7], torch.device("cpu"), rounds=3)
    assert [t.repeats for t in timings] == [6, 3, 7]
    assert sorted(calls) == sorted("a" * 6 + "b" * 3 + "c" * 7)
    # round 0 starts at a, round 1 at b, round 2 at c; c's 7th call falls in round 0
    assert calls == list("aabccc" + "bccaa" + "ccaab")
    assert all(t.low <= t.median <= t.high and t.cpu_over_wall is not None for t in timings)
    with pytest.raises(ValueError, match="2 repeat counts"):
        time_rounds(fns, [1, 2], torch.device("cpu"))
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_rounds(fns, [1, 1, 1], torch.device("cpu"), rounds=0)


def test_cases_of_a_table_are_timed_side_by_side(monkeypatch, tmp_path) -> None:
    """The CLI builds the cases of one (set, dtype, optim) together and times them in interleaved rounds:
    every case's calls span the same stretch of time; the rounds are recorded and named in the header."""
    import benchmarks.suite as suite

    seen: list[tuple[int, int]] = []
    real = suite.time_rounds

    def spy(fns, repeats, device, rounds=1):
        seen.append((len(fns), rounds))
        return real(fns, repeats, device, rounds)

    monkeypatch.setattr(suite, "time_rounds", spy)
    assert main(["--device", "cpu", "--params", "tiny", "--optim", "lars", "--repeat", "4", "--rounds", "2",
                 "--peers", "torch_fused", "--threads", "1", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("step_cpu_*.json")
    result = json.loads(json_path.read_text())
    timed = [r for r in result["rows"] if not r["skipped"]]
    assert seen == [(len(timed), 2)] and result["rounds"] == 2
    assert all(r["repeats"] == 4 for r in timed)
    assert "2 interleaved rounds" in json_path.with_suffix(".md").read_text()


def test_fused_step_probes_measure_torchs_fused_steps() -> None:
    """The roofline's fused-step probes time torch's fused SGD / AdamW over one tensor and count 20 / 28 B
    per element; an unknown probe is refused by name."""
    from benchmarks.measure import FUSED_PROBES, fused_step_bandwidth_gbs

    assert FUSED_PROBES == {"torch_fused_sgd": 20, "torch_fused_adamw": 28}
    for kind in FUSED_PROBES:
        assert fused_step_bandwidth_gbs(kind, nbytes=1 << 20, repeats=3) > 0
    with pytest.raises(ValueError, match="kind: unknown fused probe 'lion'"):
        fused_step_bandwidth_gbs("lion", nbytes=1 << 20)


def test_probes_are_timed_in_the_tables_rounds_and_bound_its_rows() -> None:
    """A bounded table times the roofline's probes as further cases of its rounds: the row's fraction is
    against the best of the run's probes and the in-round ones, and the table's probe GB/s come back."""
    import time

    from benchmarks.cases import fastlars_case
    from benchmarks.measure import Probe
    from benchmarks.suite import Bandwidths, Row, _measure_side_by_side

    def slow_probe() -> None:
        time.sleep(0.004)

    fast = Probe("fast", lambda: None, 10**9)  # ~1 GB in µs: far above any step
    slow = Probe("slow", slow_probe, 4 * 10**6)  # 4 MB in >= 4 ms: at most 1 GB/s
    rows = [Row("resnet50", "fp32", "lars", "fastlars.reference", False)]  # a model set's label, tiny shapes
    probed = _measure_side_by_side(rows, [fastlars_case("lars", "reference")], [(64, 32), (7,)], torch.float32,
                                   False, torch.device("cpu"), 3, None, 2, Bandwidths(2.0, 3.0, 1e-6),
                                   [fast, slow])
    assert set(probed) == {"fast", "slow", "best"} and probed["best"] == probed["fast"] > 1000 > probed["slow"]
    assert probed["slow"] <= 1.0
    (row,) = rows
    assert row.table_roofline_gbs == probed["best"] and row.repeats == 3
    assert row.fraction_of_roofline == pytest.approx(row.gb_per_s / probed["best"])  # not / the run's 1e-6
    # without probes: the run's roofline, nothing returned
    assert _measure_side_by_side(rows, [fastlars_case("lars", "reference")], [(8,)], torch.float32, False,
                                 torch.device("cpu"), 3, None, 1, Bandwidths(2.0, 3.0, 1e-6)) == {}
    assert rows[0].table_roofline_gbs is None and rows[0].fraction_of_roofline > 1  # 1e-6 GB/s roofline


def test_apply_rooflines_takes_the_rows_in_round_probe_when_it_is_higher() -> None:
    roofs = {"2": {"read": 40.0, "best": 40.0}}
    rows = [_big_row(SGD, 2, 44.0) | {"table_roofline_gbs": 55.0}, _big_row(SGD, 2, 44.0)]
    result = {"rows": rows, "rooflines_gbs": roofs, "last_level_cache_bytes": 32 << 20}
    apply_rooflines(result)
    assert [r["fraction_of_roofline"] for r in rows] == [pytest.approx(0.8), pytest.approx(1.1)]
    assert len(result["over_roofline"]) == 1


def test_lars_target_carries_its_byte_floor_from_the_tables_probes() -> None:
    """LARS / SGD(fused)'s floor with a separate 4-B gradient pass: (4/read + 20/sgd) / (20/sgd) from the
    probes of the LARS fp32 table on the run's full thread count; no probes, no floor."""
    from benchmarks.targets import targets_markdown

    rows = [_big_row("fastlars.native", 2, 1.0, ms=13.0, peer=False), _big_row(SGD, 2, 1.0, ms=10.0)]
    probes = {"threads": 2, "param_set": "resnet50", "dtype": "fp32", "optim": "lars", "read": 30.0,
              "torch_fused_sgd": 60.0, "best": 60.0}
    result = {"machine": {"device_type": "cpu"}, "rows": rows, "thread_counts": [2, 1],
              "table_rooflines_gbs": [probes | {"threads": 1, "read": 1.0}, probes]}
    (lars,) = [e for e in evaluate(result) if e["label"] == "resnet50 fp32: LARS native / SGD(fused) step time (21)"]
    assert lars["value"] == pytest.approx(1.3) and not lars["met"]
    assert lars["floor"] == pytest.approx(1.4)  # 4 B at half SGD's GB/s costs 0.4 of its 20 B
    assert "| resnet50 fp32: LARS native / SGD(fused) step time (21) | 1.30 | <= 1.25 | no | 1.40 |" \
        in targets_markdown(evaluate(result))
    del result["table_rooflines_gbs"]
    assert all(e["floor"] is None for e in evaluate(result))


def test_grad_scaler_tables_step_every_optimizer_through_a_gradscaler(tmp_path) -> None:
    """--grad-scaler off,on times each table twice: as is and through torch.amp.GradScaler ("fp32+GradScaler"
    rows); the compiled functional reference cannot be handed to a GradScaler and says so in its row."""
    assert main(["--device", "cpu", "--params", "tiny", "--optim", "lamb", "--repeat", "3", "--rounds", "1",
                 "--threads", "all", "--backends", "reference", "--peers", "torch_fused,reference+compile",
                 "--grad-scaler", "off,on", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("step_cpu_*.json")
    result = json.loads(json_path.read_text())
    assert result["grad_scalers"] == [False, True]
    by_dtype = {d: {r["implementation"]: r for r in result["rows"] if r["dtype"] == d}
                for d in ("fp32", "fp32+GradScaler")}
    assert set(by_dtype["fp32"]) == set(by_dtype["fp32+GradScaler"]) == {"fastlars.reference", ADAMW, COMPILED}
    assert not any(r["skipped"] for r in by_dtype["fp32"].values())
    assert "GradScaler.step needs an optimizer" in by_dtype["fp32+GradScaler"][COMPILED]["skipped"]
    assert by_dtype["fp32+GradScaler"]["fastlars.reference"]["ms_median"] > 0
    assert "**tiny, fp32+GradScaler, LAMB**" in json_path.with_suffix(".md").read_text()


@pytest.mark.parametrize("make", [
    lambda ps: fastlars.LAMB(ps, lr=1e-2, backend="reference"),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),  # no in-step scaling: unscaled in place first
])
def test_with_grad_scaler_steps_through_the_scaler_and_skips_on_inf(make) -> None:
    """The wrapped case really runs GradScaler.step: finite gradients update the weights (the scale of 1.0
    leaves the gradients as they were, however often they are unscaled), a NaN gradient skips the step."""
    params = [torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(3))]
    for p in params:
        p.grad = torch.full_like(p, 0.5)

    def factory(ps, master):
        opt = make(ps)
        return opt.step, lambda: 0

    step, _ = with_grad_scaler(Case("x", True, factory)).factory(params, False)
    step()
    step()
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)
    moved = [p.detach().clone() for p in params]
    assert all(not torch.equal(m, torch.ones_like(m)) for m in moved)
    params[1].grad[0] = float("nan")
    step()
    assert all(torch.equal(p.detach(), m) for p, m in zip(params, moved))


def test_grad_scaler_targets_use_the_grad_scaler_tables() -> None:
    rows = [_big_row("fastlars.native", 2, 1.0, ms=20.0, optim="lamb", peer=False), _big_row(ADAMW, 2, 1.0, ms=16.0,
            optim="lamb"), _big_row("fastlars.native", 2, 1.0, ms=30.0, optim="lamb", peer=False),
            _big_row(ADAMW, 2, 1.0, ms=16.5, optim="lamb")]
    for r in rows[2:]:
        r["dtype"] = "fp32+GradScaler"
    result = {"machine": {"device_type": "cpu"}, "rows": rows, "thread_counts": [2]}
    got = {e["label"]: (round(e["value"], 4), e["met"]) for e in evaluate(result)}
    assert got["resnet50 fp32: LAMB native / AdamW(fused) step time (21)"] == (1.25, True)
    assert got["resnet50 fp32+GradScaler: LAMB native / AdamW(fused) step time (21)"] == (round(30 / 16.5, 4), False)


def test_skip_nonfinite_off_adds_unchecked_fastlars_rows_to_the_plain_tables(tmp_path) -> None:
    """--skip-nonfinite on,off times each fp32 fastlars backend twice in the plain tables (the second row
    labelled UNCHECKED_SUFFIX); the GradScaler tables leave that row out (the scaler's flag replaces the
    check there either way)."""
    assert main(["--device", "cpu", "--params", "tiny", "--optim", "lars", "--repeat", "3", "--rounds", "1",
                 "--threads", "all", "--backends", "reference", "--peers", "torch_fused",
                 "--grad-scaler", "off,on", "--skip-nonfinite", "on,off", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("step_cpu_*.json")
    result = json.loads(json_path.read_text())
    assert result["skip_nonfinite"] == [True, False]
    by_dtype = {d: {r["implementation"] for r in result["rows"] if r["dtype"] == d}
                for d in ("fp32", "fp32+GradScaler")}
    assert by_dtype["fp32"] == {"fastlars.reference", "fastlars.reference" + UNCHECKED_SUFFIX, SGD}
    assert by_dtype["fp32+GradScaler"] == {"fastlars.reference", SGD}
    assert "skip_nonfinite = False" in json_path.with_suffix(".md").read_text()


def test_unchecked_case_steps_without_the_check() -> None:
    """The unchecked case's optimizer has skip_nonfinite False: a NaN gradient is not skipped but reaches
    the weights of its tensor."""
    params = [torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(3))]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    step, _ = unchecked(fastlars_case("lars", "reference")).factory(params, False)
    assert step.__self__.skip_nonfinite is False
    params[1].grad[0] = float("nan")
    step()
    assert step.__self__.skipped_steps == 0 and not torch.isfinite(params[1]).all()


def test_unchecked_targets_read_the_unchecked_rows() -> None:
    rows = [_big_row("fastlars.native", 2, 1.0, ms=30.0, optim="lamb", peer=False),
            _big_row("fastlars.native" + UNCHECKED_SUFFIX, 2, 1.0, ms=22.0, optim="lamb", peer=False),
            _big_row(ADAMW, 2, 1.0, ms=16.0, optim="lamb")]
    result = {"machine": {"device_type": "cpu"}, "rows": rows, "thread_counts": [2]}
    got = {e["label"]: (round(e["value"], 4), e["met"]) for e in evaluate(result)}
    assert got["resnet50 fp32: LAMB native / AdamW(fused) step time (21)"] == (1.875, False)
    assert got["resnet50 fp32: LAMB native (skip_nonfinite=False) / AdamW(fused) step time (21)"] == (1.375, True)
