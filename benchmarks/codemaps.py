"""`python -m benchmarks.codemaps`: choosing the 8-bit code map of fastlars' int8 optimizer state.

    python -m benchmarks.codemaps                      # accuracy and CPU speed of every candidate
    python -m benchmarks.codemaps --only speed         # CPU speed only (about a minute)
    python -m benchmarks.codemaps --only accuracy      # accuracy only (a few minutes on 2 cores)

Candidates: benchmarks/codemap_candidates.py (linear, power companding, fp8 e4m3/e5m3, dynamic tree,
dynamic tree with a squared grid for v, and the integer-only "mitchell" companding).

* **Accuracy, quantisation error**: m and v of fp32 LAMB and the momentum of fp32 LARS, snapshot at
  steps 10, 50 and 300 of training three small models (MLP, CNN, transformer encoder) on the
  scikit-learn digits; per tensor ≥ 4096 elements: ‖x̂ − x‖/‖x‖ for m, v, momentum, and for LAMB's
  direction u = m̂/(√v̂ + ε) computed from the quantised moments (what the update uses).
* **Accuracy, trajectories**: int8 LAMB and LARS (fastlars.backends.reference_lowbit) against fp32
  over 200 steps: (a) the test-suite trajectory with structured gradients (tests/lowbit_harness.py),
  where errors do not compound chaotically: mean relative parameter error and trust-ratio error;
  (b) training the three models on digits: final-loss difference and trust-ratio error, beside the
  difference a 1-ulp perturbation of the initial weights alone makes (training is chaotic).
* **CPU speed**: benchmarks/codemaps.cpp, compiled here with g++ -O3 for AVX-512, AVX2 and baseline
  x86-64, quantises (absmax + encode) and dequantises arrays of m- and v-like values in cache
  (2^15 elements) and from memory (2^24); its codes are checked against the Python encoders.

Writes Markdown and JSON under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.codemap_candidates import (
    CANDIDATES,
    DYNAMIC_TREE_SIGNED,
    DYNAMIC_TREE_SQUARED,
    DYNAMIC_TREE_UNSIGNED,
    FP8_SIGNED,
    FP8_UNSIGNED,
    LINEAR_SIGNED,
    LINEAR_UNSIGNED,
    MITCHELL_SIGNED,
    MITCHELL_UNSIGNED,
    POWER2_SIGNED,
    POWER2_UNSIGNED,
    search_table,
)
from benchmarks.lowbit_trajectory import digits_training, structured_trajectory, trajectory_error
from benchmarks.suite import machine
from fastlars.backends.quantization import (
    BLOCK_SIZE,
    POW4_SIGNED_MAP,
    POW8_UNSIGNED_MAP,
    SIGNED_MAP,
    UNSIGNED_MAP,
    CodeMap,
    dequantize_blockwise,
    quantize_blockwise,
)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "codemaps.cpp"

# ===================================================================================== speed
# Order of the value tables in tables.bin, as codemaps.cpp indexes them.
TABLE_ORDER = [LINEAR_SIGNED, LINEAR_UNSIGNED, POW4_SIGNED_MAP, POW8_UNSIGNED_MAP, FP8_SIGNED, FP8_UNSIGNED,
               DYNAMIC_TREE_SIGNED, DYNAMIC_TREE_UNSIGNED, DYNAMIC_TREE_SQUARED, POWER2_SIGNED, POWER2_UNSIGNED,
               MITCHELL_SIGNED, MITCHELL_UNSIGNED]
SEARCHES = [DYNAMIC_TREE_SIGNED, DYNAMIC_TREE_UNSIGNED, DYNAMIC_TREE_SQUARED]
# codemaps.cpp's cases in output order: name → the Python map whose encoder must give the same bytes.
CASE_MAPS = {
    "linear.m": LINEAR_SIGNED, "linear.v": LINEAR_UNSIGNED, "power.m": POW4_SIGNED_MAP,
    "power.v": POW8_UNSIGNED_MAP, "power2.m": POWER2_SIGNED, "power2.v": POWER2_UNSIGNED,
    "mitchell.m": MITCHELL_SIGNED, "mitchell.v": MITCHELL_UNSIGNED, "mitchell.m:header": SIGNED_MAP,
    "mitchell.v:header": UNSIGNED_MAP,
    "fp8.m": FP8_SIGNED, "fp8.v": FP8_UNSIGNED, "dynamic_tree.m": DYNAMIC_TREE_SIGNED,
    "dynamic_tree.v": DYNAMIC_TREE_UNSIGNED, "dynamic_tree2.v": DYNAMIC_TREE_SQUARED,
    "dynamic_tree.v:bsearch": DYNAMIC_TREE_UNSIGNED, "dynamic_tree.m:gather": DYNAMIC_TREE_SIGNED,
    "dynamic_tree.v:gather": DYNAMIC_TREE_UNSIGNED, "fp8.m:intrinsics": FP8_SIGNED, "fp8.v:intrinsics": FP8_UNSIGNED,
}
ISAS = {"avx512": ["-mavx512f", "-mavx2", "-mfma", "-mprefer-vector-width=512"], "avx2": ["-mavx2", "-mfma"],
        "baseline": []}


def write_tables(path: Path) -> None:
    """tables.bin for codemaps.cpp: the value tables, then each search table."""
    with open(path, "wb") as f:
        for code_map in TABLE_ORDER:
            f.write(code_map.values.numpy().astype("<f4").tobytes())
        for code_map in SEARCHES:
            table = search_table(code_map)
            f.write(struct.pack("<4i", table.upper.numel(), table.shift, table.base, table.lut.numel()))
            f.write(table.upper.numpy().astype("<f4").tobytes())
            f.write(table.lut.numpy().tobytes())


def moment_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """m-like (Cauchy-tailed, rows of 256 with log-uniform scales over e^±2) and v-like (≈ m² plus a
    floor) arrays, with the edge cases appended: zeros, ±0, every threshold of the search maps and
    their fp32 neighbours (rounding ties), 1 and values just above it."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.exp(4.0 * (torch.rand(n // 256 + 1, 1, generator=gen) - 0.5)).expand(-1, 256).reshape(-1)[:n]
    z = torch.tan(torch.pi * (torch.rand(n, generator=gen) - 0.5)) * 0.3
    m = (rows * z * 1e-3).float()
    v = (rows * rows * (z * z + 0.01) * 1e-6).float()
    edges = [torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, 0.5])]
    for code_map in SEARCHES:
        t = code_map.thresholds
        edges += [t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-1.0))]
    special = torch.cat(edges)
    k = special.numel()
    if n > 4 * k:  # one block of each sign, scaled by absmax 1 (an exact 1.0 in the block)
        m[:k], v[:k] = special, special.abs()
        m[k : 2 * k], v[k : 2 * k] = -special, special.abs()
    return m, v


def build(isa: str, out_dir: Path) -> Path | None:
    """Compile codemaps.cpp for one instruction set; None when the compiler or the ISA is missing."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    exe = out_dir / f"codemaps_{isa}"
    cmd = [compiler, "-std=c++17", "-O3", "-fno-math-errno", "-ffp-contract=off", *ISAS[isa], "-I",
           str(HERE.parent / "csrc" / "common"), str(SOURCE), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def run_speed(n_memory: int = 2**24, n_cache: int = 2**15, repeats_memory: int = 5, repeats_cache: int = 300,
              isas: Sequence[str] = tuple(ISAS)) -> dict[str, Any]:
    """Time every encoder/decoder for each of ``isas`` the CPU has; check the codes against Python."""
    flags = cpu_flags()
    usable = [isa for isa in isas if isa == "baseline" or (isa == "avx2" and "avx2" in flags)
              or (isa == "avx512" and "avx512f" in flags)]
    results: dict[str, Any] = {"elements_memory": n_memory, "elements_cache": n_cache, "isas": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_tables(work / "tables.bin")
        inputs = {}
        for label, n in (("cache", n_cache), ("memory", n_memory)):
            m, v = moment_like(n)
            inputs[label] = (m, v)
            with open(work / f"in_{label}.bin", "wb") as f:
                f.write(struct.pack("<q", n))
                f.write(m.numpy().astype("<f4").tobytes())
                f.write(v.numpy().astype("<f4").tobytes())
        for isa in usable:
            exe = build(isa, work)
            if exe is None:
                results["isas"][isa] = {"skipped": "no C++ compiler"}
                continue
            timings: dict[str, dict[str, float]] = {}
            for label, n, repeats in (("cache", n_cache, repeats_cache), ("memory", n_memory, repeats_memory)):
                codes_path = work / f"codes_{isa}_{label}.bin"
                out = subprocess.run([str(exe), str(work / "tables.bin"), str(work / f"in_{label}.bin"),
                                      str(repeats), str(codes_path)], check=True, capture_output=True, text=True)
                cases = []
                for line in out.stdout.splitlines():
                    name, op, seconds = line.split()
                    timings.setdefault(f"{name} {op}", {})[label] = n / float(seconds) / 1e9
                    if op == "encode" and name in CASE_MAPS:
                        cases.append(name)
                if label == "cache":
                    check_codes(codes_path, cases, *inputs[label])
            results["isas"][isa] = {"gelem_per_s": timings}
    return results


def check_codes(path: Path, cases: Sequence[str], m: torch.Tensor, v: torch.Tensor) -> None:
    """Every C++ encoder's bytes equal the Python encoder's (raises naming the first that differs)."""
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    n = m.numel()
    for i, name in enumerate(cases):
        code_map = CASE_MAPS[name]
        x = m if name.split(".")[1].startswith("m") else v
        want, _ = quantize_blockwise(x, code_map)
        got = data[i * n : (i + 1) * n]
        bad = (got != want).nonzero()
        if bad.numel():
            j = int(bad[0])
            raise AssertionError(f"codemaps.cpp {name}: {bad.numel()} codes differ from Python, first at {j}: "
                                 f"x={float(x[j])!r} C++ {int(got[j])} Python {int(want[j])}")


def speed_markdown(results: dict[str, Any]) -> str:
    """One table per ISA: G elements/s of each encoder and decoder, in cache and from memory."""
    lines = []
    for isa, entry in results["isas"].items():
        if "skipped" in entry:
            lines.append(f"{isa}: skipped ({entry['skipped']})")
            continue
        lines += [f"**{isa}** (G elements/s; in cache: {results['elements_cache']} elements, from memory: "
                  f"{results['elements_memory']})", "", "| operation | in cache | from memory |", "|---|---:|---:|"]
        for op, values in entry["gelem_per_s"].items():
            cache, memory = values.get("cache", float("nan")), values.get("memory", float("nan"))
            lines.append(f"| {op} | {cache:.2f} | {memory:.2f} |")
        lines.append("")
    return "\n".join(lines)


# ================================================================================== accuracy
DIGITS_MODELS = ("mlp", "cnn", "transformer")
BLOCKS = (64, 128, 256, 512, 2048)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _summary(values: Sequence[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"median": float(t.median()), "p90": float(t.quantile(0.9)), "max": float(t.max())}


def _roundtrip(x: torch.Tensor, fmt: str, code_map: CodeMap, block: int) -> torch.Tensor:
    if fmt == "bf16":
        return x.to(torch.bfloat16).float()
    return dequantize_blockwise(*quantize_blockwise(x, code_map, block), code_map, block)


def snapshots(steps: int = 200, at: Sequence[int] = (10, 50, 200)) -> dict[str, list]:
    """fp32 LAMB (m, v, t) and LARS (momentum) states of the digits models at steps ``at``."""
    out: dict[str, list] = {"lamb": [], "lars": []}
    for model in DIGITS_MODELS:
        for algorithm in ("lamb", "lars"):
            run = digits_training(model, algorithm, steps=steps, snapshot_at=at)
            out[algorithm] += [(t, buffers) for t, _, buffers in run.snapshots]
    return out


def quantisation_errors(snaps: dict[str, list], formats: dict[str, tuple[str, CodeMap, CodeMap]],
                        block: int = BLOCK_SIZE) -> dict[str, dict[str, dict[str, float]]]:
    """Per format: ||x̂ − x||/||x|| of m, v, LARS momentum and of LAMB's u = m̂/(√v̂ + ε) over the
    snapshot tensors (median, 90th percentile, max)."""
    results = {}
    for name, (fmt, signed, unsigned) in formats.items():
        em, ev, eu, emom = [], [], [], []
        for t, (m, v) in snaps["lamb"]:
            mq, vq = _roundtrip(m, fmt, signed, block), _roundtrip(v, fmt, unsigned, block)
            bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
            u = (m / bc1) / (torch.sqrt(v / bc2) + 1e-6)
            uq = (mq / bc1) / (torch.sqrt(vq / bc2) + 1e-6)
            em.append(_rel(mq, m))
            ev.append(_rel(vq, v))
            eu.append(_rel(uq, u))
        for _, (b,) in snaps["lars"]:
            emom.append(_rel(_roundtrip(b, fmt, signed, block), b))
        results[name] = {"m": _summary(em), "v": _summary(ev), "u": _summary(eu), "momentum": _summary(emom)}
    return results


def structured_errors(formats: dict[str, tuple[str, CodeMap, CodeMap]],
                      block: int = BLOCK_SIZE) -> dict[str, dict[str, dict[str, float]]]:
    """Per format and algorithm: the 200-step structured trajectory's error against fp32."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for algorithm in ("lamb", "lars"):
        ref = structured_trajectory(algorithm, "fp32")
        for name, (fmt, signed, unsigned) in formats.items():
            run = structured_trajectory(algorithm, fmt, maps=(signed, unsigned), block=block)
            results.setdefault(name, {})[algorithm] = vars(trajectory_error(run, ref))
    return results


def rounding_errors() -> dict[str, dict[str, dict[str, float]]]:
    """bf16 weights without fp32 masters, updated by stochastic rounding (seed 1234) or round-to-nearest,
    with fp32/bf16/int8 state, against the fp32-master run from the same bf16 initial weights."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for algorithm in ("lamb", "lars"):
        ref = structured_trajectory(algorithm, "fp32", init_dtype=torch.bfloat16)
        for label, state, sr_seed in (("stochastic rounding, fp32 state", "fp32", 1234),
                                      ("stochastic rounding, bf16 state", "bf16", 1234),
                                      ("stochastic rounding, int8 state", "int8", 1234),
                                      ("nearest-even rounding, fp32 state", "fp32", None)):
            run = structured_trajectory(algorithm, state, param_dtype=torch.bfloat16, sr_seed=sr_seed)
            results.setdefault(label, {})[algorithm] = vars(trajectory_error(run, ref))
    return results


def digits_errors(formats: dict[str, tuple[str, CodeMap, CodeMap]], steps: int = 200) -> dict[str, Any]:
    """Per model, algorithm and format: final-loss difference (mean of the last 20 steps) to fp32,
    trust-ratio error and parameter error; "fp32, 1 ulp" is fp32 from initial weights perturbed by 1 ulp."""
    results: dict[str, Any] = {}
    for model in DIGITS_MODELS:
        for algorithm in ("lamb", "lars"):
            ref = digits_training(model, algorithm, steps=steps)
            runs = {"fp32, 1 ulp": digits_training(model, algorithm, steps=steps, perturb=True)}
            for name, (fmt, signed, unsigned) in formats.items():
                runs[name] = digits_training(model, algorithm, fmt, steps=steps, maps=(signed, unsigned))
            row = {"fp32 final loss": sum(ref.losses[-20:]) / 20}
            for name, run in runs.items():
                ratios = torch.stack(run.ratios).double()
                ref_ratios = torch.stack(ref.ratios).double()
                adapted = [i for i, p in enumerate(ref.params) if p.dim() > 1]
                ratio_rel = ((ratios - ref_ratios).abs() / ref_ratios.abs())[:, adapted]
                big = [i for i, p in enumerate(ref.params) if p.numel() >= 4096]
                row[name] = {"loss_diff": sum(run.losses[-20:]) / 20 - row["fp32 final loss"],
                             "ratio_mean_rel": float(ratio_rel.mean()),
                             "param_norm_rel": max(_rel(run.params[i], ref.params[i]) for i in big)}
            results[f"{model} {algorithm}"] = row
    return results


def accuracy_formats() -> dict[str, tuple[str, CodeMap, CodeMap]]:
    """bf16 state and every int8 candidate, as (state dtype, signed map, unsigned map)."""
    formats = {"bf16": ("bf16", SIGNED_MAP, UNSIGNED_MAP)}
    formats.update({f"int8 {name}": ("int8", *maps) for name, maps in CANDIDATES.items()})
    return formats


def run_accuracy(digits_steps: int = 200) -> dict[str, Any]:
    """Every accuracy measure of the module docstring."""
    formats = accuracy_formats()
    snaps = snapshots()
    chosen = {"int8 mitchell": formats["int8 mitchell"]}
    digits_formats = {k: formats[k] for k in ("bf16", "int8 power", "int8 dynamic_tree2", "int8 fp8", "int8 mitchell")}
    return {
        "quantisation": quantisation_errors(snaps, formats),
        "structured": structured_errors(formats),
        "bf16_weights": rounding_errors(),
        "blocks": {str(b): {"quantisation": quantisation_errors(snaps, chosen, b)["int8 mitchell"],
                            "structured": structured_errors(chosen, b)["int8 mitchell"]} for b in BLOCKS},
        "digits": digits_errors(digits_formats, digits_steps),
    }


def _e(x: float) -> str:
    return f"{x:.2e}"


def accuracy_markdown(acc: dict[str, Any]) -> str:
    """The accuracy tables (quantisation error, structured trajectories, block sizes, digits)."""
    lines = ["**Quantisation error** ||x̂ − x||/||x|| on fp32 LAMB/LARS states of the digits models "
             "(median / 90th percentile / max over tensors; u = m̂/(√v̂ + ε) from the quantised m, v)", "",
             "| format | m | v | u | LARS momentum |", "|---|---|---|---|---|"]
    for name, r in acc["quantisation"].items():
        cells = [f"{_e(r[k]['median'])} / {_e(r[k]['p90'])} / {_e(r[k]['max'])}" for k in ("m", "v", "u", "momentum")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "**Structured trajectory**, 200 steps against fp32 (param: mean of |Δp|/|p| over elements, "
              "and the largest ||Δp||/||p|| over tensors; trust ratio: mean and max relative error)", "",
              "| format | LAMB param mean / norm | LAMB ratio mean / max | LARS param mean / norm | "
              "LARS ratio mean / max |", "|---|---|---|---|---|"]
    for name, r in acc["structured"].items():
        cells = []
        for algorithm in ("lamb", "lars"):
            e = r[algorithm]
            cells += [f"{_e(e['param_mean_rel'])} / {_e(e['param_norm_rel'])}",
                      f"{_e(e['ratio_mean_rel'])} / {_e(e['ratio_max_rel'])}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "**bf16 weights without fp32 masters** (structured trajectory, against fp32 masters from the "
              "same bf16 initial weights)", "",
              "| weights, state | LAMB param mean / norm | LAMB ratio mean / max | LARS param mean / norm | "
              "LARS ratio mean / max |", "|---|---|---|---|---|"]
    for name, r in acc["bf16_weights"].items():
        cells = []
        for algorithm in ("lamb", "lars"):
            e = r[algorithm]
            cells += [f"{_e(e['param_mean_rel'])} / {_e(e['param_norm_rel'])}",
                      f"{_e(e['ratio_mean_rel'])} / {_e(e['ratio_max_rel'])}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "**Block size** (int8 mitchell): u error median / max, LAMB structured param norm error and "
              "ratio max error, LARS param norm error", "",
              "| block | scale bytes/elem | u median / max | LAMB param norm | LAMB ratio max | LARS param norm |",
              "|---:|---:|---|---|---|---|"]
    for block, r in acc["blocks"].items():
        u, lamb, lars = r["quantisation"]["u"], r["structured"]["lamb"], r["structured"]["lars"]
        lines.append(f"| {block} | {4 / int(block):.4f} | {_e(u['median'])} / {_e(u['max'])} | "
                     f"{_e(lamb['param_norm_rel'])} | {_e(lamb['ratio_max_rel'])} | {_e(lars['param_norm_rel'])} |")
    lines += ["", "**Digits training**, 200 steps: final-loss difference to fp32 (mean of the last 20 steps), "
              "trust-ratio mean relative error, largest parameter norm error", ""]
    names = [k for k in next(iter(acc["digits"].values())) if k != "fp32 final loss"]
    lines += ["| run | fp32 loss | " + " | ".join(names) + " |", "|---|---:|" + "---|" * len(names)]
    for run, row in acc["digits"].items():
        cells = [f"{row[n]['loss_diff']:+.4f}, {_e(row[n]['ratio_mean_rel'])}, {_e(row[n]['param_norm_rel'])}"
                 for n in names]
        lines.append(f"| {run} | {row['fp32 final loss']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ============================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.codemaps", description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("speed", "accuracy"), default=None)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    info = machine(torch.device("cpu"))
    info["isa_flags"] = sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "sse4")))
    results: dict[str, Any] = {"machine": info}
    sections = []
    if args.only in (None, "speed"):
        results["speed"] = run_speed()
        sections.append(speed_markdown(results["speed"]))
    if args.only in (None, "accuracy"):
        results["accuracy"] = run_accuracy()
        sections.append(accuracy_markdown(results["accuracy"]))
    command = "python -m benchmarks.codemaps" + (f" --only {args.only}" if args.only else "")
    header = (f"Code maps of the int8 optimizer state: `{command}`"
              f" on {info['device']} ({info['cpus']} CPUs, load {info['loadavg_1_5_15min_at_start']}), torch "
              f"{info['torch']}, commit {info['commit'][:10]}, {info['date_utc']}")
    text = header + "\n\n" + "\n\n".join(sections) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{info['device']}_{info['cpus']}cpu").strip("_")[:48]
    stem = f"codemaps{'_' + args.only if args.only else ''}_cpu_{tag}_{info['date_utc'][:10]}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
