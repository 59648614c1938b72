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
    assert {"power.m", "power.v", "mitchell.m:header", "mitchell.v:header", "dynamic_tree.m", "fp8.v", "mitchell.m",
            "mitchell.v"} <= checked
    assert "| mitchell.m:header encode |" in speed_markdown(results)
