"""The GPU session's smoke stage: do the GPU kernels run, and do they agree with the reference?

One case per GPU backend (native, triton) × algorithm (LAMB, LARS) × dtype (fp32, bf16 + fp32 master),
each fastlars.selfcheck.check_case: 3 seeded steps on the GPU against the reference backend on the
same GPU, every parameter, state tensor and trust ratio compared within the test suite's tolerance.

Then the low-precision kernels (csrc/cuda/lowbit.cu; fastlars/backends/triton/lowbit.py), one case per
backend × algorithm (lowbit_case): bf16 params with fp32 masters and int8 state (min_quantized_size
LOWBIT_MIN_QUANTIZED, every tensor of LOWBIT_SHAPES quantised, each with a ragged last block), 3 steps,
each step taken by the backend and by the reference backend (fastlars.backends.reference_lowbit, THE spec)
from the same state: the backend's state is copied into the reference's optimizer before every step. The
comparison is tests/test_native_lowbit.py's one-step oracle (check_one_step): int8 codes equal but for
rounding ties (at most one code apart, on at most LOWBIT_TIES of the codes; near zero, where codes are
1e-8 of the scale apart, any two codes that decode within 1e-6 of the scale), block scales within 1 ulp
(LAMB: m and v never see the ratio) or 1e-5 relative (LARS: its momentum carries lr·r·d), trust ratios
within 1e-5 relative, fp32 masters within 1e-6 of each tensor's largest, bf16 params one ulp apart on at
most 1e-3 of them.

One line per case as it finishes (max |Δ| against the tolerance, seconds), so that even a call cut short
says what ran, with its seconds. No case starts later than --budget seconds after the imports (default 18:
about 23 s of the stage's 30, leaving a Triton int8 case, which compiles its kernels, time to finish); one
not started is listed as not run, and the tests stage runs its kernels. Exit
status: 0 when every case that ran matches, 1 when one mismatches, errors or its backend is not usable on
the GPU (with the reason), 2 when no CUDA GPU is visible.

    python3 .ci/gpu_smoke.py [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working tree's fastlars

import torch

from fastlars import LAMB, LARS, backends, selfcheck
from fastlars.backends import quantization as q

START = time.perf_counter()
"""After the imports (about 5 s of the stage's 30 on the H200: 18 s for the stage, 13.1 s for its 8 cases)."""

BACKENDS = ("native", "triton")
ALGORITHMS = ("lamb", "lars")
DTYPES = ("fp32", "bf16+master")

LOWBIT_SHAPES: tuple[tuple[int, ...], ...] = ((257,), (5, 300), (4097,))
"""int8 state on each (≥ LOWBIT_MIN_QUANTIZED elements): a block of 1 after a full one, rows of 300 (a
block of 256 and one of 44 per row), 16 full blocks and one of 1. One storage kind, so one Triton bucket
(each more would compile the kernels again)."""
LOWBIT_MIN_QUANTIZED = 256
LOWBIT_STEPS = 3
LOWBIT_DTYPE = "bf16+master int8"
LOWBIT_OPTIONS = {
    "lamb": (LAMB, {"lr": 2e-2, "weight_decay": 1e-2}),
    "lars": (LARS, {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3}),
}
LOWBIT_TIES = 1e-4
"""Fraction of the codes that may differ by one (rounding ties), as the test suite's one-step oracle; at
least LOWBIT_MIN_TIES codes, as these few thousand codes would otherwise allow none."""
LOWBIT_MIN_TIES = 2
RATIO_RTOL = 1e-5
MASTER_TOL = 1e-6
BF16_FRACTION = 1e-3


@dataclass
class LowbitResult:
    """One low-precision case: the worst figures over its steps, and what failed."""

    backend: str
    algorithm: str
    worst: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures

    def describe(self, device: str = "cuda") -> str:
        name = f"{device:<5} {self.backend:<8} {self.algorithm:<5} {LOWBIT_DTYPE:<16}"
        if self.error is not None:
            return f"{name} {'ERROR':<8} {self.error}"
        w = self.worst
        figures = (f"codes {int(w.get('codes_differing', 0))} of {int(w.get('codes', 0))} differ (max "
                   f"{int(w.get('code_max', 0))}), scales {w.get('scale_ulps', 0):.0f} ulp / "
                   f"{w.get('scale_rel', 0.0):.1e}, ratios {w.get('ratio', 0.0):.1e}, masters "
                   f"{w.get('master', 0.0):.1e}, bf16 params {w.get('bf16_fraction', 0.0):.1e} differ")
        verdict = "ok" if self.ok else "MISMATCH"
        tail = "" if self.ok else "; " + "; ".join(self.failures[:3])
        return f"{name} {verdict:<8} {figures} in {self.seconds:.1f} s{tail}"


def _lowbit_optimizer(device: torch.device, backend: str, algorithm: str):
    cls, options = LOWBIT_OPTIONS[algorithm]
    generator = torch.Generator().manual_seed(0)
    params = [(torch.randn(s, generator=generator) * 0.5).to(device, torch.bfloat16).requires_grad_()
              for s in LOWBIT_SHAPES]
    opt = cls(params, backend=backend, master_weights=True, state_dtype="int8",
              min_quantized_size=LOWBIT_MIN_QUANTIZED, **options)
    opt.record_trust_ratios()
    return params, opt


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|difference| in units in the last place of non-negative fp32 values (their bit patterns are ordered)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def compare_lowbit(ref_opt, opt, algorithm: str, result: LowbitResult, step: int) -> None:
    """Compare the state, masters, params and trust ratios of two optimizers after one step from the same
    state; worst figures into result.worst, broken rules into result.failures."""
    w = result.worst
    codes = differing = 0
    for p_ref, p in zip(ref_opt.param_groups[0]["params"], opt.param_groups[0]["params"]):
        s_ref, s = ref_opt.state[p_ref], opt.state[p]
        for name in ("exp_avg", "exp_avg_sq") if algorithm == "lamb" else ("momentum_buffer",):
            record = s.get(q.FORMAT_KEY)
            if record is None or record["dtype"] != "int8":
                result.failures.append(f"step {step}: {tuple(p.shape)} {name} is not int8 state")
                continue
            code_map = q.CODE_MAPS[record["maps"][name]]
            a, b = s_ref[name], s[name]
            sa, sb = s_ref[name + q.ABSMAX_SUFFIX], s[name + q.ABSMAX_SUFFIX]
            ka, kb = (a.view(torch.int8), b.view(torch.int8)) if code_map.signed else (a, b)
            diff = (ka.long() - kb.long()).abs()
            codes += diff.numel()
            differing += int((diff > 0).sum())
            top = 127 if code_map.signed else 255
            scale = q.dequantize_blockwise(torch.full_like(a, top), sa, code_map)
            near = (q.dequantize_blockwise(a, sa, code_map) - q.dequantize_blockwise(b, sb, code_map)).abs() \
                <= 1e-6 * scale
            far = diff[~near]
            w["code_max"] = max(w.get("code_max", 0), int(far.max()) if far.numel() else 0)
            if sa.numel():
                w["scale_ulps"] = max(w.get("scale_ulps", 0), int(_ulps(sa, sb).max()))
                rel = ((sa - sb).abs() / sa.clamp_min(1e-30)).max().item()
                w["scale_rel"] = max(w.get("scale_rel", 0.0), rel)
        ma, mb = s_ref["master_param"], s["master_param"]
        if ma.numel():
            w["master"] = max(w.get("master", 0.0), ((ma - mb).abs().max() / ma.abs().max()).item())
            big = torch.maximum(p_ref.float().abs(), p.float().abs())
            close = (p_ref.float() - p.float()).abs() <= 2**-7 * big + 1e-6 * big.max()
            if not bool(close.all()):
                result.failures.append(f"step {step}: {tuple(p.shape)} bf16 params more than one ulp apart")
            w["bf16_fraction"] = max(w.get("bf16_fraction", 0.0), (p_ref != p).float().mean().item())
    w["codes"] = max(w.get("codes", 0), codes)
    w["codes_differing"] = max(w.get("codes_differing", 0), differing)
    r_ref, r = ref_opt.trust_ratios[0], opt.trust_ratios[0]
    w["ratio"] = max(w.get("ratio", 0.0), ((r_ref - r).abs() / r_ref.abs()).max().item())
    rules = [
        (differing <= max(LOWBIT_MIN_TIES, LOWBIT_TIES * codes), f"{differing} of {codes} codes differ"),
        (w.get("code_max", 0) <= 1, f"codes {w.get('code_max')} apart"),
        (w["ratio"] <= RATIO_RTOL, f"trust ratios {w['ratio']:.1e} apart"),
        (w.get("master", 0.0) <= MASTER_TOL, f"masters {w.get('master', 0.0):.1e} apart"),
        (w.get("bf16_fraction", 0.0) <= BF16_FRACTION, f"{w.get('bf16_fraction', 0.0):.1e} of the params differ"),
        (w.get("scale_ulps", 0) <= 1 if algorithm == "lamb" else w.get("scale_rel", 0.0) <= RATIO_RTOL,
         f"block scales {w.get('scale_ulps', 0)} ulp / {w.get('scale_rel', 0.0):.1e} apart"),
    ]
    result.failures += [f"step {step}: {why}" for ok, why in rules if not ok]


def _copy_state(source, target) -> None:
    """The target optimizer's params and state tensors ← the source's (same shapes and formats)."""
    with torch.no_grad():
        for p_src, p_dst in zip(source.param_groups[0]["params"], target.param_groups[0]["params"]):
            p_dst.copy_(p_src)
            for key, value in source.state[p_src].items():
                if isinstance(value, torch.Tensor):
                    target.state[p_dst][key].copy_(value)


def lowbit_case(device: torch.device, backend: str, algorithm: str, steps: int = LOWBIT_STEPS) -> LowbitResult:
    """LOWBIT_STEPS steps of `backend` with int8 state, each checked against the reference backend taking the
    same step from the same state (see the module docstring); an exception is a failed case."""
    result = LowbitResult(backend, algorithm)
    start = time.perf_counter()
    try:
        params, opt = _lowbit_optimizer(device, backend, algorithm)
        ref_params, ref_opt = _lowbit_optimizer(device, "reference", algorithm)
        generator = torch.Generator().manual_seed(1)
        for step in range(1, steps + 1):
            if step > 1:
                _copy_state(opt, ref_opt)
            for p, p_ref in zip(params, ref_params):
                g = (torch.randn(p.shape, generator=generator) + 0.5).to(device, torch.bfloat16)
                p.grad, p_ref.grad = g, g.clone()
            opt.step()
            ref_opt.step()
            compare_lowbit(ref_opt, opt, algorithm, result, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a crashing backend is what the smoke stage exists to report
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def cases() -> list[tuple[str, str, str]]:
    """(backend, algorithm, dtype) in the order run: per backend its fp32-state cases, then its int8 ones."""
    out = []
    for backend in BACKENDS:
        out += [(backend, a, d) for a in ALGORITHMS for d in DTYPES]
        out += [(backend, a, LOWBIT_DTYPE) for a in ALGORITHMS]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the cases; the exit status as in the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=18.0,
                        help="start no case later than this many seconds after the imports (default 18)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA GPU; none is visible to torch", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    failed = not_run = 0
    unusable: dict[tuple[str, bool], str | None] = {}
    for backend, algorithm, dtype in cases():
        lowbit = dtype == LOWBIT_DTYPE
        key = (backend, lowbit)
        if key not in unusable:
            reason = backends.unavailable_reason(backend, device)
            if reason is None and lowbit:
                reason = backends.low_precision_unavailable_reason(backend, device)
            unusable[key] = reason
            if reason is not None:
                what = f"{backend} ({'int8 state' if lowbit else 'fp32 state'})"
                print(f"cuda  {what} NOT USABLE on {torch.cuda.get_device_name()}: {reason}", flush=True)
        if unusable[key] is not None:
            failed += 1
            continue
        if time.perf_counter() - START > args.budget:
            print(f"cuda  {backend:<8} {algorithm:<5} {dtype:<16} NOT RUN: {args.budget:g} s of the smoke budget "
                  "spent (the tests stage runs these kernels)", flush=True)
            not_run += 1
            continue
        case_start = time.perf_counter()
        if lowbit:
            result = lowbit_case(device, backend, algorithm)
            print(result.describe(), flush=True)
        else:
            result = selfcheck.check_case(device, backend, algorithm, dtype)
            print(f"{selfcheck.describe(result)} in {time.perf_counter() - case_start:.1f} s", flush=True)
        failed += not result.ok
    total = len(cases())
    skipped = f", {not_run} not run (budget)" if not_run else ""
    print(f"smoke: {total - failed - not_run} of {total} cases match the reference{skipped} in "
          f"{time.perf_counter() - START:.1f} s")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
