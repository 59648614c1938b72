"""Data-parallel training with fastlars equals one-process training of the same global batch.

Two gloo processes on CPU, each with half the batch: plain DDP, ZeroRedundancyOptimizer (through
fastlars.distributed.zero_redundancy_optimizer) and FSDP2 (fully_shard: DTensor shards, one layer
whose shard is empty on one rank). LARS and LAMB (with global gradient clipping), 20 steps with a
changing learning rate. A NaN gradient on one rank's shard makes every rank skip the step. int8
optimizer state: DDP and ZeRO (whole tensors per rank) equal one process with int8 state; FSDP2 (DTensor
shards) refuses it with an error that says why.
"""

from __future__ import annotations

import distributed_workers as workers
import pytest
import torch
import torch.multiprocessing as mp

from harness import assert_params_match

WORLD = 2


def _spawn(tmp_path, mode: str, algo: str, poison_step: int | None = None) -> tuple[dict, dict]:
    out = str(tmp_path / f"{mode}-{algo}.pt")
    init_file = str(tmp_path / f"init-{mode}-{algo}")
    mp.spawn(workers.worker, args=(WORLD, init_file, mode, algo, out, poison_step), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True), torch.load(out + ".rank1", weights_only=True)


def _run(tmp_path, mode: str, algo: str, poison_step: int | None = None) -> dict:
    result, other = _spawn(tmp_path, mode, algo, poison_step)
    assert_params_match(other["params"], result["params"], tol=0.0)  # every rank holds the same model
    assert other["skipped"] == result["skipped"]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero", "fsdp2"])
@pytest.mark.parametrize("algo", ["lars", "lamb"])
def test_two_processes_equal_one(tmp_path, mode: str, algo: str) -> None:
    result = _run(tmp_path, mode, algo)
    expected = workers.single_process(algo)
    assert result["skipped"] == 0
    assert_params_match(result["params"], expected, tol=1e-5)
    moved = sum((p - q).norm() for p, q in zip(expected, workers.make_model().parameters()))
    assert moved > 0.1, "the comparison would be vacuous if training did not move the weights"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero", "fsdp2"])
def test_nan_on_one_rank_skips_the_step_everywhere(tmp_path, mode: str) -> None:
    """A NaN in rank 1's gradient shard/partition: both ranks skip step 7, exactly like one process."""
    result = _run(tmp_path, mode, "lamb", poison_step=7)
    assert result["skipped"] == 1
    assert_params_match(result["params"], workers.single_process("lamb", poison_step=7), tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero", "fsdp2"])
def test_unchecked_lars_still_skips_where_the_norms_are_reduced(tmp_path, mode: str) -> None:
    """skip_nonfinite=False: LARS under ZeRO (a stats_group) and over FSDP2 shards reduces every ||g|| over
    the ranks all the same, so the NaN on rank 1 still skips step 7 on both, exactly like one checked
    process."""
    result = _run(tmp_path, mode + "-unchecked", "lars", poison_step=7)
    assert result["skipped"] == 1
    assert_params_match(result["params"], workers.single_process("lars", poison_step=7), tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp-int8", "zero-int8"])
def test_int8_state_two_processes_equal_one(tmp_path, mode: str) -> None:
    """int8 LAMB state (every adapting tensor quantised) under DDP and ZeRO: whole tensors on every rank, so
    the blocks and codes are those of one process."""
    result = _run(tmp_path, mode, "lamb")
    expected = workers.single_process("lamb", **workers.INT8_STATE)
    assert result["skipped"] == 0
    assert_params_match(result["params"], expected, tol=1e-5)
    fp32 = workers.single_process("lamb")
    assert max((a - b).abs().max().item() for a, b in zip(expected, fp32)) > 0, "int8 state changed nothing"


@pytest.mark.slow
def test_fsdp2_refuses_low_precision_state(tmp_path) -> None:
    for message in _spawn(tmp_path, "fsdp2-refused", "lamb"):
        assert "sharded (DTensor)" in message["message"] and "state_dtype" in message["message"]
