"""TensorBoard as a view of a run's metrics.jsonl: each record the trainer logs becomes, at its update
step, the scalars and histograms below. metrics.jsonl stays the record of truth; nothing here is
computed that the record does not hold.

| record field     | TensorBoard                                                              |
|------------------|--------------------------------------------------------------------------|
| loss, lr         | scalars train/loss, train/lr                                             |
| top1, top5       | scalars eval/top1, eval/top5 (at evaluations)                            |
| w_dist           | scalar train/weight_distance (‖w_t − w_0‖)                               |
| b_simple         | scalar train/b_simple (gradient noise scale)                             |
| optimizer_share  | scalar perf/optimizer_share (optimizer.step() / whole updates)          |
| images_per_s     | scalar perf/images_per_s                                                 |
| trust_ratios     | histogram trust_ratio/layers (one value per adapting layer), and one    |
|                  | scalar trust_ratio/<parameter name> per layer                            |

Under `--resume` the writer purges what a killed run logged after its checkpoint (purge_step), so
the view holds the records of the trajectory being continued, as metrics.jsonl does. Events reach the
file every FLUSH_SECONDS and when the run ends.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "top1": "eval/top1",
    "top5": "eval/top5",
    "w_dist": "train/weight_distance",
    "b_simple": "train/b_simple",
    "optimizer_share": "perf/optimizer_share",
    "images_per_s": "perf/images_per_s",
}
TRUST_RATIO_HISTOGRAM = "trust_ratio/layers"
TRUST_RATIO_PREFIX = "trust_ratio/"
FLUSH_SECONDS = 10
NOT_INSTALLED = "TensorBoard logging is off: the tensorboard package is not installed (pip install tensorboard)"


def installed() -> bool:
    """Whether the tensorboard package (which torch.utils.tensorboard writes with) is importable."""
    return importlib.util.find_spec("tensorboard") is not None


def resolve(setting: str, out: Path) -> Path | None:
    """The log folder of `--tensorboard SETTING`: "off" → None; "auto" → OUT/tensorboard when tensorboard is
    installed, else None; a folder → that folder (ValueError when tensorboard is not installed)."""
    if setting == "off":
        return None
    if setting == "auto":
        return out / "tensorboard" if installed() else None
    if not installed():
        raise ValueError(f"--tensorboard {setting}: the tensorboard package is not installed "
                         "(pip install tensorboard), or pass --no-tensorboard")
    return Path(setting)


class TensorBoardView:
    """Writes metrics records to TensorBoard event files in `logdir`. `purge_step`: events at this
    step and later, left by an earlier process in the same folder, are dropped by the readers."""

    def __init__(self, logdir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(str(self.logdir), purge_step=purge_step, flush_secs=FLUSH_SECONDS)

    def write_config(self, config: dict[str, Any]) -> None:
        """The run's configuration as a text summary (what config.json holds)."""
        self.writer.add_text("config", "    " + json.dumps(config, indent=2, default=str).replace("\n", "\n    "))

    def write(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record at its step."""
        step = int(record["step"])
        for field, tag in SCALARS.items():
            value = record.get(field)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        ratios = record.get("trust_ratios") or {}
        values = [v for v in ratios.values() if v is not None and math.isfinite(v)]
        if values:
            self.writer.add_histogram(TRUST_RATIO_HISTOGRAM, np.asarray(values, dtype=np.float64), step)
        for name, value in ratios.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(TRUST_RATIO_PREFIX + name, value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
