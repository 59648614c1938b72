"""benchmarks/codemaps.py: its C++ encoders (benchmarks/codemaps.cpp, including the production
functions of csrc/common/quant_math.h) give the Python candidates' codes byte for byte, on edge
cases and moment-like data, for the baseline build and, where the CPU has it, AVX2."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.codemaps import CASE_MAPS, run_speed, speed_markdown


def test_cpp_encoders_match_python() -> None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on PATH to build benchmarks/codemaps.cpp")
    results = run_speed(n_memory=8192, n_cache=4096, repeats_memory=1, repeats_cache=1, isas=("baseline", "avx2"))
    timings = results["isas"]["baseline"]["gelem_per_s"]  # check_codes raised if any byte differed
    checked = {op.split()[0] for op in timings if op.endswith(" encode")} & set(CASE_MAPS)
    assert {"power.m", "power.v", "power.m:header", "power.v:header", "dynamic_tree.m", "fp8.v", "mitchell.m",
            "mitchell.v"} <= checked
    assert "| power.m:header encode |" in speed_markdown(results)


def test_mitchell_maps_are_monotone_exact_at_one_and_near_the_power_maps() -> None:
    """The integer-only candidate: codes decode to increasing magnitudes, 0 and ±1 exactly, every code's
    value encodes back to that code (the clamped −128 byte aside), and its companding lies between the
    power map's roots and 6.1% above them (Mitchell's logarithm errs by at most 0.086 in log2)."""
    import torch

    from benchmarks.codemap_candidates import MITCHELL_SIGNED, MITCHELL_UNSIGNED, mitchell_compand

    magnitudes = MITCHELL_SIGNED.values[:128]
    assert bool((magnitudes[1:] > magnitudes[:-1]).all()) and float(magnitudes[0]) == 0.0
    assert float(magnitudes[127]) == 1.0 and float(MITCHELL_SIGNED.values[129]) == -1.0
    assert bool((MITCHELL_UNSIGNED.values[1:] > MITCHELL_UNSIGNED.values[:-1]).all())
    assert float(MITCHELL_UNSIGNED.values[0]) == 0.0 and float(MITCHELL_UNSIGNED.values[255]) == 1.0
    codes = torch.arange(256).to(torch.uint8)
    assert torch.equal(MITCHELL_UNSIGNED.encode(MITCHELL_UNSIGNED.values), codes)
    back = MITCHELL_SIGNED.encode(MITCHELL_SIGNED.values)
    assert torch.equal(back[codes != 128], codes[codes != 128]) and int(back[128]) == 129
    a = torch.logspace(-30, 0, 10001, dtype=torch.float64).float()
    for shift in (2, 3):
        ratio = mitchell_compand(a, shift).double() / a.double() ** (1.0 / 2**shift)
        assert 1.06 < float(ratio.max()) <= 2**0.086 and float(ratio.min()) >= 1 - 1e-6
