"""Data-parallel training with fastlars equals one-process training of the same global batch.

Two gloo processes on CPU, each with half the batch: plain DDP, ZeroRedundancyOptimizer (through
fastlars.distributed.zero_redundancy_optimizer) and FSDP2 (fully_shard: DTensor shards, one layer
whose shard is empty on one rank). LARS and LAMB (with global gradient clipping), 20 steps with a
changing learning rate. A NaN gradient on one rank's shard makes every rank skip the step.
"""

from __future__ import annotations

import distributed_workers as workers
import pytest
import torch
import torch.multiprocessing as mp

from harness import assert_params_match

WORLD = 2


def _run(tmp_path, mode: str, algo: str, poison_step: int | None = None) -> dict:
    out = str(tmp_path / f"{mode}-{algo}.pt")
    init_file = str(tmp_path / f"init-{mode}-{algo}")
    mp.spawn(workers.worker, args=(WORLD, init_file, mode, algo, out, poison_step), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    other = torch.load(out + ".rank1", weights_only=True)
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
