"""Test configuration: the `cuda` marker skips with a reason where no GPU is visible."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/harness.py is importable as `harness`


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


LAMB_WORKSPACE_ELEMENTS = 1 << 18
"""The native CPU LAMB keeps its update direction u between its two passes for groups of up to a limit
that follows the machine's cache (csrc/cpu/tensor_groups.h: from 2^18 elements to a quarter of the
last-level cache at 20 B per element). The suite pins the smallest, so its shapes take both branches,
u stored and u recomputed, on every machine (test_cpu_parallel.py checks the default)."""


@pytest.fixture(autouse=True)
def lamb_workspace_of_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLARS_LAMB_WORKSPACE_ELEMENTS", str(LAMB_WORKSPACE_ELEMENTS))
