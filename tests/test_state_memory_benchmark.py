"""`python -m benchmarks.state_memory` measures what fastlars.LAMB/LARS hold: exact bytes per key on the
`tiny` set ((64, 32, 3, 3) conv weight: 18,432 elements, 64 rows of 288 = 2 blocks each; a (10, 64)
linear weight below min_quantized_size; three 1-d tensors that param_groups keeps unadapted), and the
meta device reports what the CPU does."""

from __future__ import annotations

import pytest
import torch

from benchmarks import state_memory as sm

BIG, SMALL = 18432, 64 + 64 + 640 + 10  # elements quantised / kept at full precision
SCALES = 64 * 2 * 4  # fp32 absmax per 256-element block, blocks do not span rows


def _mode(label_part: str) -> sm.Mode:
    return next(m for m in sm.MODES if m.label == label_part)


def test_int8_lamb_with_masters_holds_codes_scales_and_fp32_masters() -> None:
    r = sm.measure("tiny", "lamb", _mode("bf16 params + fp32 masters, int8 state"))
    n = BIG + SMALL
    assert (r.parameters, r.param_bytes, r.grad_bytes) == (n, 2 * n, 2 * n)
    moment = BIG + 4 * SMALL  # uint8 codes; fp32 for the small and unadapted tensors
    assert r.state_bytes_by_key == {"step": 5 * 4, "master_param": 4 * n, "exp_avg": moment,
                                    "exp_avg_absmax": SCALES, "exp_avg_sq": moment, "exp_avg_sq_absmax": SCALES}
    assert r.bytes_per_parameter == pytest.approx((4 * n + 4 * n + 20 + 2 * (moment + SCALES)) / n)


def test_int8_lars_with_stochastic_rounding_keeps_no_master() -> None:
    """Without masters, "full precision" state of bf16 params is bf16 (2 B) for the tensors left out."""
    r = sm.measure("tiny", "lars", _mode("bf16 params (stochastic rounding), int8 state"))
    assert r.state_bytes_by_key == {"step": 20, "momentum_buffer": BIG + 2 * SMALL, "momentum_buffer_absmax": SCALES}


@pytest.mark.parametrize("algorithm", sm.ALGORITHMS)
def test_meta_device_reports_what_the_cpu_holds(algorithm: str) -> None:
    for mode in sm.MODES:
        meta, cpu = sm.measure("tiny", algorithm, mode, "meta"), sm.measure("tiny", algorithm, mode, "cpu")
        assert meta == cpu, mode.label


def test_cli_writes_json_and_markdown(tmp_path, capsys) -> None:
    assert sm.main(["--params", "tiny", "--out", str(tmp_path)]) == 0
    md = next(tmp_path.glob("state_memory_meta_*.md")).read_text()
    assert "| bf16 params + fp32 masters, int8 state | 10.30 (6.30) | 9.15 (5.15) |" in md
    assert "tiny LAMB total (state)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sm.main(["--params", "nope"])


def test_modes_cover_each_format() -> None:
    assert {(m.param_dtype, m.masters, m.state_dtype) for m in sm.MODES} >= {
        (torch.bfloat16, True, d) for d in ("fp32", "bf16", "int8")}
    assert all(m.stochastic_rounding == (m.param_dtype == torch.bfloat16 and not m.masters) for m in sm.MODES)
