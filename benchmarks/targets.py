"""The issues' performance targets, evaluated on a result (never asserted: a benchmark is not a test).

CPU (issue 3, ResNet-50 set, fp32): LAMB native ≤ 1.2× AdamW(fused) step time and ≥ 6× faster than
timm Lamb; LARS native ≤ 1.0× AdamW(fused) step time (the LAMB table's AdamW row, as issue 3 words
it) and, stricter, against SGD(fused, momentum), which moves the same 20 B per element as LARS.
GPU (issue 4, fp32): LAMB native on BERT-Large ≥ 80% of the copy bandwidth and ≥ 1.5× faster than
apex FusedLAMB; LARS native on ResNet-50 ≤ 1.2× SGD(fused, momentum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ADAMW = "torch.AdamW(fused) [same 28 B]"
SGD = "torch.SGD(fused, momentum) [same 20 B]"


@dataclass(frozen=True)
class Target:
    """`value` = median(numerator) / median(denominator) (or the fraction of copy bandwidth when
    `denominator` is None) compared with `bound` by `sense` ('<=' or '>='); the denominator's row is
    looked up under `denominator_optim` (default: `optim`)."""

    device_type: str
    param_set: str
    optim: str
    numerator: str
    denominator: str | None
    sense: str
    bound: float
    label: str
    denominator_optim: str | None = None


TARGETS = (
    Target("cpu", "resnet50", "lamb", "fastlars.native", ADAMW, "<=", 1.2, "LAMB native / AdamW(fused) step time"),
    Target("cpu", "resnet50", "lamb", "timm.Lamb", "fastlars.native", ">=", 6.0, "timm Lamb / LAMB native step time"),
    Target("cpu", "resnet50", "lars", "fastlars.native", ADAMW, "<=", 1.0, "LARS native / AdamW(fused) step time",
           "lamb"),
    Target("cpu", "resnet50", "lars", "fastlars.native", SGD, "<=", 1.0, "LARS native / SGD(fused) step time"),
    Target("cuda", "bert_large", "lamb", "fastlars.native", None, ">=", 0.8, "LAMB native fraction of copy"),
    Target("cuda", "bert_large", "lamb", "apex.FusedLAMB", "fastlars.native", ">=", 1.5,
           "apex FusedLAMB / LAMB native step time"),
    Target("cuda", "resnet50", "lars", "fastlars.native", SGD, "<=", 1.2, "LARS native / SGD(fused) step time"),
)


def _row(rows: list[dict[str, Any]], t: Target, optim: str, implementation: str) -> dict[str, Any] | None:
    for r in rows:
        if (r["param_set"], r["dtype"], r["optim"], r["implementation"]) == (t.param_set, "fp32", optim,
                                                                            implementation) and not r["skipped"]:
            return r
    return None


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the result's device type whose rows were measured: label, value, bound, met."""
    out = []
    for t in TARGETS:
        if t.device_type != result["machine"]["device_type"]:
            continue
        num = _row(result["rows"], t, t.optim, t.numerator)
        den = _row(result["rows"], t, t.denominator_optim or t.optim, t.denominator) if t.denominator else None
        if num is None or (t.denominator and den is None):
            continue
        value = num["ms_median"] / den["ms_median"] if den else num["fraction_of_copy"]
        met = value <= t.bound if t.sense == "<=" else value >= t.bound
        out.append({"label": f"{t.param_set} fp32: {t.label}", "value": value, "bound": f"{t.sense} {t.bound}",
                    "met": met})
    return out


def targets_markdown(evaluated: list[dict[str, Any]]) -> str:
    """A table of the evaluated targets (empty string when none applies)."""
    if not evaluated:
        return ""
    lines = ["| target | measured | bound | met |", "|---|---:|---:|:---:|"]
    lines += [f"| {e['label']} | {e['value']:.2f} | {e['bound']} | {'yes' if e['met'] else 'no'} |" for e in evaluated]
    return "\n".join(lines)
