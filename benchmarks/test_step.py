"""The suite's cases under pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Environment: FASTLARS_BENCH_DEVICE (default cuda when visible, else cpu), FASTLARS_BENCH_PARAMS
(default resnet50,bert_base on CPU, resnet50,bert_large on CUDA), FASTLARS_BENCH_DTYPE (default fp32),
FASTLARS_BENCH_ROUNDS (timed steps per case, default 20). A backend or peer that cannot run here is
a skip with its reason (shown by pytest -ra), never left out silently. Each case's compulsory bytes and
GB/s go into the benchmark's extra_info. Not part of the unit tests (tests/ is the testpath).
"""

from __future__ import annotations

import os

import pytest
import torch

import fastlars
from benchmarks.cases import PEERS, unavailable_peers
from benchmarks.params import PARAM_SETS, make_params
from benchmarks.suite import DTYPES, plan

DEVICE = torch.device(os.environ.get("FASTLARS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
SETS = os.environ.get("FASTLARS_BENCH_PARAMS", "resnet50,bert_base" if DEVICE.type == "cpu" else
                      "resnet50,bert_large").split(",")
DTYPE_NAMES = os.environ.get("FASTLARS_BENCH_DTYPE", "fp32").split(",")
ROUNDS = int(os.environ.get("FASTLARS_BENCH_ROUNDS", "20"))
BACKENDS = ("reference", "foreach", "native", "triton")


def _cases() -> list:
    usable = fastlars.available_backends(DEVICE)
    skipped = unavailable_peers(DEVICE)
    out = []
    for optim in ("lamb", "lars"):
        for name in BACKENDS:
            if name not in usable:
                reason = fastlars.backends.unavailable_reason(name, DEVICE)
                out.append(pytest.param(optim, None, f"fastlars.{name}: {reason}", id=f"{optim}-fastlars.{name}"))
        for case in plan(optim, [b for b in BACKENDS if b in usable], tuple(p for p in PEERS if p not in skipped),
                         DEVICE):
            out.append(pytest.param(optim, case, None, id=f"{optim}-{case.implementation}"))
        for peer in PEERS:
            if peer in skipped and not (optim == "lars" and peer in ("apex", "deepspeed")):
                out.append(pytest.param(optim, None, f"{peer}: {skipped[peer]}", id=f"{optim}-{peer}"))
    return out


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("set_name", SETS)
@pytest.mark.parametrize("optim,case,skip_reason", _cases())
def test_step(benchmark, set_name: str, dtype_name: str, optim: str, case, skip_reason: str | None) -> None:
    """One optimizer step of `case` on the parameter set, timed by pytest-benchmark after warm-up
    (each call synchronises the GPU so host timing covers the kernels)."""
    if skip_reason:
        pytest.skip(skip_reason)
    dtype, master = DTYPES[dtype_name]
    params = make_params(PARAM_SETS[set_name].shapes(), dtype, DEVICE)
    step, bytes_of = case.factory(params, master)

    def timed() -> None:
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    nbytes = bytes_of()
    benchmark.extra_info.update(compulsory_bytes=nbytes, device=str(DEVICE), param_set=set_name, dtype=dtype_name,
                                gb_per_s=nbytes / benchmark.stats.stats.median / 1e9)
