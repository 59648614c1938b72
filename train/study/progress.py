"""The sweep's one progress line: share of the estimated work done, runs done/planned, elapsed and ETA.

A run's work is its PlannedRun.work estimate. The ETA is the remaining work at the average rate of the
work trained so far; runs read from the cache count as done and not in the rate.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

from train.study.sweep import PlannedRun, Progress


class SweepBar(Progress):
    """A tqdm line "study NAME: runs D/P (C cached) 47%|████   | [02:31<02:50]" on `file`."""

    def __init__(self, name: str, enabled: bool = True, file: TextIO | None = None) -> None:
        self.name = name
        self.runs = self.done = self.cached = 0
        self.bar = tqdm(total=0, disable=not enabled, file=file or sys.stderr, smoothing=0, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]", mininterval=0.5)
        self._describe()

    def _describe(self) -> None:
        cached = f" ({self.cached} cached)" if self.cached else ""
        self.bar.set_description_str(f"study {self.name}: runs {self.done}/{self.runs}{cached}", refresh=False)

    def planned(self, run: PlannedRun) -> None:
        """Count the run and its work in the totals."""
        self.runs += 1
        self.bar.total += run.work
        self._describe()

    def finished(self, run: PlannedRun, record: dict[str, Any], cached: bool) -> None:
        """Advance by the run's work; cached work moves the bar but not the rate."""
        self.done += 1
        if cached:
            self.cached += 1
            if not self.bar.disable:  # a disabled tqdm keeps no rate
                self.bar.initial += run.work
        self._describe()
        self.bar.update(run.work)

    def close(self) -> None:
        """End the line."""
        self.bar.close()
