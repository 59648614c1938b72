"""The state-formats comparison: top-1 with bf16 or int8 optimizer state against fp32 state, paired by seed.

Every run of an optimizer X at batch B trains at one LR (the one fp32 state was chosen at) on the
held-out seeds; a seed fixes the initialisation, the data order and the fold, so the runs of X at B
with state formats F and fp32 on the same seed differ only in the state format. For the n seeds
trained in both, with d_s = top1_F(s) − top1_fp32(s):

    difference = mean(d_s) ± t_{(1+confidence)/2, n−1} · sd(d_s) / √n

(train.study.stats.mean_interval of the d_s: a paired t interval). Against the margin m (1 point of
top-1, stated before the run) the verdict of (X, B, F) is
- "within": the whole interval lies inside (−m, +m): F's top-1 is within m of fp32's;
- "differs": the whole interval lies beyond +m or beyond −m (so it also excludes 0);
- "cannot tell": otherwise (the interval reaches a margin, or is unbounded from fewer than 2 pairs).
The verdict of F at batch B over the optimizers: "within" when every optimizer's is, "differs" when
some optimizer's is, "cannot tell" otherwise. Each interval stands alone (no multiplicity correction
across the cells); `excludes_zero` says where a difference is detectable though smaller than m.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from train.study import stats
from train.study.analysis import Record, epoch_records, seed_of
from train.study.stats import Interval

REFERENCE = "fp32"
MARGIN = 0.01
WITHIN, DIFFERS, CANNOT_TELL = "within", "differs", "cannot tell"


def state_of(record: Record) -> str:
    """The run's optimizer state format (the trainer's --optim-state; fp32 when its config has none)."""
    return str(record["config"].get("optim_state", REFERENCE))


def optimizer_of(record: Record) -> str:
    """The run's trainer optimizer ("lars", "lamb", ...), whatever its contestant label."""
    return str(record["config"]["optimizer"])


def verdict_of(difference: Interval, margin: float = MARGIN) -> str:
    """WITHIN when the interval lies inside (−margin, +margin), DIFFERS when it lies wholly beyond one of
    them, CANNOT_TELL otherwise (stats.versus_margin against each margin)."""
    above_low = stats.versus_margin(difference, -margin)
    below_high = stats.versus_margin(difference, margin)
    if above_low == stats.ABOVE and below_high == stats.BELOW:
        return WITHIN
    if below_high == stats.ABOVE or above_low == stats.BELOW:
        return DIFFERS
    return CANNOT_TELL


@dataclass(frozen=True)
class Comparison:
    """State format `state` of `optimizer` at `batch` against fp32 state: the seeds trained in both, each
    format's mean top-1 over them (intervals), the paired difference (state − fp32, top-1 fraction)
    and its verdict; `per_seed` holds (seed, top1_state, top1_fp32). `lr` is the LR both trained at.
    `optimizer_share`: the mean fraction of step time in optimizer.step() of the state format's runs and
    of the fp32 runs (how the backends' speed shows here: low-precision state runs the reference)."""

    optimizer: str
    batch: int
    state: str
    lr: float
    per_seed: tuple[tuple[int, float, float], ...]
    top1: Interval
    fp32_top1: Interval
    difference: Interval
    verdict: str
    optimizer_share: float
    fp32_optimizer_share: float

    @property
    def seeds(self) -> int:
        """How many seeds were paired."""
        return len(self.per_seed)

    @property
    def excludes_zero(self) -> bool:
        """Whether the difference's interval excludes 0."""
        return self.difference.low > 0 or self.difference.high < 0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (unbounded interval ends as None)."""
        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        return clean({**asdict(self), "seeds": self.seeds, "excludes_zero": self.excludes_zero})


def _groups(records: Iterable[Record]) -> dict[tuple[str, int, str], dict[int, Record]]:
    groups: dict[tuple[str, int, str], dict[int, Record]] = {}
    for r in epoch_records(records):
        groups.setdefault((optimizer_of(r), int(r["batch"]), state_of(r)), {})[seed_of(r)] = r
    return groups


def compare(records: Iterable[Record], margin: float = MARGIN, confidence: float = 0.95) -> list[Comparison]:
    """Every (optimizer, batch, non-fp32 state) with fp32 runs of the same optimizer and batch, compared on
    the seeds both trained, in order of optimizer, batch and state as they first appear."""
    groups = _groups(records)
    out = []
    for (optimizer, batch, state), runs in groups.items():
        reference = groups.get((optimizer, batch, REFERENCE))
        if state == REFERENCE or reference is None:
            continue
        seeds = sorted(set(runs) & set(reference))
        if not seeds:
            continue
        pairs = tuple((s, float(runs[s]["result"]["top1"]), float(reference[s]["result"]["top1"])) for s in seeds)
        difference = stats.mean_interval([a - b for _, a, b in pairs], confidence)
        out.append(Comparison(
            optimizer, batch, state, float(runs[seeds[0]]["lr"]), pairs,
            stats.mean_interval([a for _, a, _ in pairs], confidence),
            stats.mean_interval([b for _, _, b in pairs], confidence),
            difference, verdict_of(difference, margin),
            statistics.fmean(float(runs[s]["result"]["optimizer_share"]) for s in seeds),
            statistics.fmean(float(reference[s]["result"]["optimizer_share"]) for s in seeds)))
    order = {key: i for i, key in enumerate(groups)}
    return sorted(out, key=lambda c: (c.optimizer, c.batch, order[(c.optimizer, c.batch, c.state)]))


def batch_verdicts(comparisons: Sequence[Comparison], state: str) -> dict[int, str]:
    """The verdict of `state` per batch over the optimizers compared there (module docstring)."""
    by_batch: dict[int, list[str]] = {}
    for c in comparisons:
        if c.state == state:
            by_batch.setdefault(c.batch, []).append(c.verdict)
    out = {}
    for batch in sorted(by_batch):
        verdicts = by_batch[batch]
        out[batch] = (WITHIN if all(v == WITHIN for v in verdicts)
                      else DIFFERS if DIFFERS in verdicts else CANNOT_TELL)
    return out


def verdict_sentence(state: str, verdict: str, margin: float = MARGIN) -> str:
    """"int8 within 1 point of fp32", "int8 differs from fp32 by more than 1 point" or "cannot tell"."""
    points = f"{100 * margin:g} point{'' if 100 * margin == 1 else 's'}"
    if verdict == WITHIN:
        return f"{state} within {points} of {REFERENCE}"
    if verdict == DIFFERS:
        return f"{state} differs from {REFERENCE} by more than {points}"
    return "cannot tell"
