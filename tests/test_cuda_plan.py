"""The native CUDA launch plan (csrc/cuda/launch_plan.h) as a pure function of (sizes, SM count, L2 size).

fastlars._C.cuda_plan runs, in the CPU build, the very function the CUDA build plans its launches with.
Checked here with H100 (132 SMs, 50 MB L2) and H200 (132 SMs, 60 MB L2) figures against an independent
Python statement of the rules, plus the launch counts per step the README states.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.params import PARAM_SETS

_C = pytest.importorskip("fastlars._C", reason="fastlars._C is not built (python setup.py build_ext --inplace)")
if not hasattr(_C, "cuda_plan"):
    pytest.skip("fastlars._C predates cuda_plan: rebuild it", allow_module_level=True)

GPUS = {"H100": (132, 50_000_000), "H200": (132, 60_000_000)}
CHUNK = 16_384
PARAM_BYTES = 32_764
DEPTH = {"grad_norms": 1, "lars": 4, "lamb": 5}
PASS1_BYTES = {"grad_norms": 0, "lars": 4, "lamb": 16}


def _sizes(model: str) -> list[int]:
    return [math.prod(s) for s in PARAM_SETS[model].shapes()]


def _model_waves(op: str, sizes: list[int], l2: int, plan: str) -> list[list[int]]:
    """The rules, restated: non-empty tensors in order; a wave closes when its table is full or, for a
    two-pass op under the wave plan, once its pass-1 bytes reach half the L2."""
    capacity = (PARAM_BYTES - 512 - 16) // (DEPTH[op] * 8 + 20)
    budget = l2 // 2 if plan == "wave" and op != "grad_norms" else 0
    waves, wave, load = [], [], 0
    for n in sizes:
        if n == 0:
            continue
        wave.append(n)
        load += n * PASS1_BYTES[op]
        if len(wave) == capacity or (budget and load >= budget):
            waves.append(wave)
            wave, load = [], 0
    return waves + ([wave] if wave else [])


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("model", ["bert_large", "resnet50"])
@pytest.mark.parametrize("op", ["lamb", "lars", "grad_norms"])
@pytest.mark.parametrize("plan", ["wave", "onepass"])
def test_plan_follows_the_rules(gpu, model, op, plan) -> None:
    sms, l2 = GPUS[gpu]
    sizes = _sizes(model)
    got = _C.cuda_plan(op, [sizes], sms, l2, plan)
    waves = _model_waves(op, sizes, l2, plan)
    per_wave = 2 if op == "grad_norms" else 3
    assert got["waves"] == len(waves)
    assert got["launches"] == per_wave * len(waves) == len(got["grid"])
    assert got["total_chunks"] == sum(math.ceil(n / CHUNK) for n in sizes)
    chunk_grids = [g for g, c in zip(got["grid"], got["chunked"]) if c]
    expected = []
    for w in waves:
        grid = min(sum(math.ceil(n / CHUNK) for n in w), 4 * sms)
        expected += [grid] if op == "grad_norms" else [grid, grid]
    assert chunk_grids == expected
    assert [g for g, c in zip(got["grid"], got["chunked"]) if not c] == [len(w) for w in waves]


def test_launches_per_step_for_bert_large_and_resnet50() -> None:
    """The figures the README states (LAMB and LARS step ops; LARS adds 2 grad-norm launches either way)."""
    table = {}
    for model in ("bert_large", "resnet50"):
        for gpu, (sms, l2) in GPUS.items():
            for op in ("lamb", "lars"):
                for plan in ("wave", "onepass"):
                    table[model, gpu, op, plan] = _C.cuda_plan(op, [_sizes(model)], sms, l2, plan)["launches"]
    assert table["bert_large", "H200", "lamb", "wave"] == 294
    assert table["bert_large", "H100", "lamb", "wave"] == 294
    assert table["bert_large", "H200", "lars", "wave"] == 114
    assert table["bert_large", "H100", "lars", "wave"] == 147
    assert table["resnet50", "H200", "lamb", "wave"] == 33
    assert table["resnet50", "H100", "lamb", "wave"] == 36
    assert table["resnet50", "H200", "lars", "wave"] == 12
    assert all(v == 3 for k, v in table.items() if k[3] == "onepass")  # one table holds every tensor
    for sms, l2 in GPUS.values():
        assert _C.cuda_plan("grad_norms", [_sizes("bert_large")], sms, l2)["launches"] == 2


def test_plan_edges() -> None:
    sms, l2 = GPUS["H200"]
    many = [7] * 1_200  # more tensors than one LAMB table holds (537): three tables
    capacity = (PARAM_BYTES - 528) // (5 * 8 + 20)
    assert _C.cuda_plan("lamb", [many], sms, l2, "onepass")["launches"] == 3 * math.ceil(1_200 / capacity) == 9
    assert _C.cuda_plan("lamb", [[0, 0]], sms, l2)["launches"] == 0  # empty tensors own no chunk, no launch
    no_adapt = _C.cuda_plan("lamb", [_sizes("bert_large")], sms, l2, "wave", adapt=False)
    assert no_adapt["launches"] == no_adapt["waves"] == 1  # one pass: the wave budget does not apply
    two = _C.cuda_plan("lars", [[100_000, 5], [3_000_000]], sms, l2, "onepass")  # two storage buckets
    assert two["waves"] == 2 and two["launches"] == 6 and two["total_chunks"] == 7 + 1 + 184
    with pytest.raises(ValueError, match="FASTLARS_CUDA_PLAN: expected 'wave' or 'onepass'"):
        _C.cuda_plan("lamb", [[5]], sms, l2, "fast")
    with pytest.raises(ValueError, match="op: expected"):
        _C.cuda_plan("adam", [[5]], sms, l2)
