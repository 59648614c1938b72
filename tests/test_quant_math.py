"""csrc/common/quant_math.h (the per-element maths the CPU and CUDA kernels will share) gives the same
bits as the Python spec, fastlars/backends/quantization.py, on generated inputs: every code, rounding
ties of both maps, zeros, subnormals, ±max, non-finite blocks, ragged blocks, RNG keys over the whole
index range and stochastic rounding of every kind of fp32 value. The header is also compiled for a GPU
(nvcc, when present), so its device path builds."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlars.backends import quantization as q

ROOT = Path(__file__).resolve().parents[1]
HEADER_DIR = ROOT / "csrc" / "common"
TEST_SOURCE = HEADER_DIR / "test" / "quant_math_test.cpp"


@pytest.fixture(scope="module")
def quant_math_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """quant_math_test.cpp built with the host flags of setup.py (about 2 s)."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH to build csrc/common/test/quant_math_test.cpp")
    exe = tmp_path_factory.mktemp("quant_math") / "quant_math_test"
    cmd = [compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra", "-Werror",
           "-I", str(HEADER_DIR), str(TEST_SOURCE), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).float()


def _neighbours(x: torch.Tensor, ulps: int = 3) -> torch.Tensor:
    """x and its fp32 neighbours up to ``ulps`` away on both sides."""
    out, up, down = [x], x, x
    for _ in range(ulps):
        up = torch.nextafter(up, torch.tensor(np.inf, dtype=torch.float32))
        down = torch.nextafter(down, torch.tensor(-np.inf, dtype=torch.float32))
        out += [up, down]
    return torch.cat(out)


def _exact_ties(levels: int, shift: int) -> torch.Tensor:
    """Normalised values y ≥ 0 whose companded code position c_s(y)·levels is exactly k + ½ in fp32:
    c_s(y) = t exactly for y = e_s(t) and the 2^s − 1 patterns above it (the bits c_s shifts out)."""
    ties = []
    for k in range(levels):
        t = _f32([(k + 0.5) / levels])
        if float(t * levels) != k + 0.5:
            continue
        base = q.mitchell_expand(t, shift).view(torch.int32)
        hits = (base + torch.arange(2**shift, dtype=torch.int32)).view(torch.float32)
        assert torch.equal(q.mitchell_compand(hits, shift), t.expand(2**shift))
        ties.append(hits)
    return torch.cat(ties)


def encode_inputs() -> torch.Tensor:
    """Normalised values for the encoders: random, rounding ties and near-ties of both maps, decoded
    values of every code, and the special values."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.rand(20_000, generator=gen) * 2.02 - 1.01]
    for levels, shift in ((127, 2), (255, 3)):
        ties = _exact_ties(levels, shift)
        assert ties.numel() >= 10, "the tie generator found too few exact ties to test rint's rule"
        near = _neighbours(ties, 2**shift + 2)
        parts += [near, -near, ties, -ties]
    for code_map in (q.SIGNED_MAP, q.UNSIGNED_MAP):
        parts.append(_neighbours(code_map.values, 2))
    tiny = torch.tensor([1, 2, 3, 0x7FFFFF, 0x800000, 0x800001], dtype=torch.int32).view(torch.float32)
    parts += [tiny, -tiny, _f32([0.0, -0.0, 1.0, -1.0, 2.0**-100, 0.5, 1e-20, 1e-30]),
              _neighbours(_f32([1.0, -1.0]), 2)]
    return torch.cat(parts).contiguous()


def block_row() -> torch.Tensor:
    """One row of blocks of 256: random, all zero, subnormal only, NaN, +inf, −inf, a negative absmax,
    ±FLT_MAX, the smallest normal absmax, subnormal elements under a normal absmax; a ragged tail of 77."""
    gen = torch.Generator().manual_seed(1)

    def randn() -> torch.Tensor:
        return torch.randn(256, generator=gen)

    subnormal = torch.randint(1, 0x7FFFFF, (256,), generator=gen, dtype=torch.int32).view(torch.float32)
    blocks = [randn() * 1e-3, torch.zeros(256), subnormal * torch.sign(randn())]
    for special in (float("nan"), float("inf"), float("-inf")):
        b = randn()
        b[17] = special
        blocks.append(b)
    b = randn()
    b[5] = -40.0
    blocks.append(b)
    b = randn() * 1e37
    b[0], b[1] = 3.4028234663852886e38, -3.4028234663852886e38
    blocks.append(b)
    b = randn() * 2.0**-130
    b[9] = 2.0**-126
    blocks.append(b)
    b = subnormal * 1.0
    b[3] = 1e-30
    blocks.append(b)
    blocks.append(randn()[:77] ** 2)
    return torch.cat(blocks).float().contiguous()


def rng_queries() -> list[tuple[int, int, int, float, int]]:
    """(seed, tensor, stream, step, index) covering 32-bit extremes and indices beyond 2^32."""
    gen = np.random.default_rng(2)
    queries = []
    for _ in range(300):
        queries.append((int(gen.integers(0, 2**32)), int(gen.integers(0, 5000)), int(gen.integers(0, 3)),
                        float(gen.integers(0, 2**24)), int(gen.integers(0, 2**40))))
    for seed in (0, 1, 2**32 - 1):
        for index in (0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 12345):
            queries.append((seed, 7, 0, 1.0, index))
    queries += [(5, 0, 0, 0.0, 0), (5, 2**32 - 1, 2**32 - 1, float(2**24), 2**63 - 1)]
    return queries


def sr_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values of every kind and random bits, including r = 0 and r = 2^32 − 1."""
    gen = torch.Generator().manual_seed(3)
    specials = torch.tensor([0, 0x80000000, 1, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F800000,
                             0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x3F800000, 0x3F80FFFF, 0x3F808000],
                            dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([torch.randn(5000, generator=gen) * 10.0 ** torch.randint(-40, 38, (5000,), generator=gen),
                   specials.repeat_interleave(4)])
    r = torch.randint(0, 2**32, (x.numel(),), generator=gen, dtype=torch.int64)
    r[-specials.numel() * 4 :: 4] = 0
    r[-specials.numel() * 4 + 1 :: 4] = 2**32 - 1
    return x.float().contiguous(), r


def run_header(exe: Path, tmp_path: Path, y: torch.Tensor, row: torch.Tensor, queries: list,
               sr_x: torch.Tensor, sr_r: torch.Tensor) -> dict[str, np.ndarray]:
    """Run quant_math_test on the inputs and parse its outputs."""
    inputs, outputs = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inputs, "wb") as f:
        for arr in (y, row):
            f.write(struct.pack("<q", arr.numel()) + arr.numpy().astype("<f4").tobytes())
        f.write(struct.pack("<q", len(queries)))
        for seed, tensor, stream, step, index in queries:
            f.write(struct.pack("<IIIfQ", seed, tensor, stream, step, index))
        pairs = np.zeros(sr_x.numel(), dtype=[("x", "<f4"), ("r", "<u4")])
        pairs["x"], pairs["r"] = sr_x.numpy(), sr_r.numpy().astype(np.uint32)
        f.write(struct.pack("<q", sr_x.numel()) + pairs.tobytes())
    subprocess.run([str(exe), str(inputs), str(outputs)], check=True, capture_output=True, text=True)
    data = outputs.read_bytes()
    out, pos = {}, 0

    def take(name: str, dtype: str, count: int) -> None:
        nonlocal pos
        size = np.dtype(dtype).itemsize * count
        out[name] = np.frombuffer(data[pos : pos + size], dtype=dtype)
        pos += size

    n, m, blocks = y.numel(), row.numel(), -(-row.numel() // q.BLOCK_SIZE)
    take("enc_s", "u1", n)
    take("enc_u", "u1", n)
    take("dec_s", "<f4", 256)
    take("dec_u", "<f4", 256)
    for kind in ("s", "u"):
        take(f"codes_{kind}", "u1", m)
        take(f"scales_{kind}", "<f4", blocks)
        take(f"deq_{kind}", "<f4", m)
    take("bits", "<u4", len(queries))
    take("bf16", "<u2", sr_x.numel())
    assert pos == len(data), "quant_math_test wrote more than expected"
    return out


@pytest.fixture(scope="module")
def header_outputs(quant_math_exe: Path, tmp_path_factory: pytest.TempPathFactory):
    y, row, queries, (sr_x, sr_r) = encode_inputs(), block_row(), rng_queries(), sr_inputs()
    out = run_header(quant_math_exe, tmp_path_factory.mktemp("quant_math_io"), y, row, queries, sr_x, sr_r)
    return out, y, row, queries, sr_x, sr_r


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.int32)


def _first_mismatch(name: str, got: np.ndarray, want: np.ndarray, inputs: torch.Tensor) -> str:
    bad = np.nonzero(got != want)[0]
    if bad.size == 0:
        return ""
    i = int(bad[0])
    return f"{name}: {bad.size} differ; first at {i}: input {float(inputs[i])!r} header {got[i]} spec {want[i]}"


def test_encoders_match_the_spec(header_outputs) -> None:
    out, y, *_ = header_outputs
    for key, code_map in (("enc_s", q.SIGNED_MAP), ("enc_u", q.UNSIGNED_MAP)):
        want = code_map.encode(y).numpy()
        assert not _first_mismatch(key, out[key], want, y), _first_mismatch(key, out[key], want, y)


def test_decode_tables_match_the_spec(header_outputs) -> None:
    out, *_ = header_outputs
    assert np.array_equal(_bits(out["dec_s"]), _bits(q.SIGNED_MAP.values.numpy()))
    assert np.array_equal(_bits(out["dec_u"]), _bits(q.UNSIGNED_MAP.values.numpy()))


def test_block_quantisation_matches_the_spec(header_outputs) -> None:
    """Codes, scales (bit for bit, NaN included) and decoded values of a row with special blocks."""
    out, _, row, *_ = header_outputs
    for kind, code_map in (("s", q.SIGNED_MAP), ("u", q.UNSIGNED_MAP)):
        codes, scales = q.quantize_blockwise(row, code_map)
        decoded = q.dequantize_blockwise(codes, scales, code_map)
        message = _first_mismatch(f"codes_{kind}", out[f"codes_{kind}"], codes.numpy(), row)
        assert not message, message
        assert np.array_equal(_bits(out[f"scales_{kind}"]), _bits(scales.reshape(-1).numpy()))
        got, want = out[f"deq_{kind}"], decoded.numpy()
        assert np.array_equal(np.isnan(got), np.isnan(want))
        finite = ~np.isnan(want)
        assert np.array_equal(_bits(got[finite]), _bits(want[finite]))
    # the row holds what it claims to: a flushed, a NaN-scaled and a zero block, and a ragged tail
    scales = out["scales_s"]
    assert scales[1] == 0 and scales[2] == 0 and np.isnan(scales[3]) and np.isnan(scales[4]) and np.isnan(scales[5])
    assert row.numel() % q.BLOCK_SIZE == 77


def test_rng_matches_the_spec(header_outputs) -> None:
    out, _, _, queries, *_ = header_outputs
    want = []
    for seed, tensor, stream, step, index in queries:
        key = q.sr_key(q.sr_tensor_key(seed, tensor, stream), torch.tensor(step))
        want.append(int(q.sr_bits(key, torch.tensor([index], dtype=torch.int64))[0]))
    assert np.array_equal(out["bits"], np.array(want, dtype=np.uint32))


def test_stochastic_rounding_matches_the_spec(header_outputs) -> None:
    out, *_, sr_x, sr_r = header_outputs
    want = q.stochastic_round_bf16(sr_x, sr_r).view(torch.int16).numpy().view(np.uint16)
    message = _first_mismatch("bf16", out["bf16"], want, sr_x)
    assert not message, message


def test_header_compiles_for_cuda(tmp_path: Path) -> None:
    """Every function of quant_math.h used from a kernel compiles for sm_90 (nvcc -c, about 10 s)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: the device path of csrc/common/quant_math.h is compiled in CI")
    source = tmp_path / "quant_math_device.cu"
    source.write_text(
        '#include "quant_math.h"\n'
        "namespace q = fastlars::quant;\n"
        "__global__ void touch(const float* x, unsigned char* codes, float* out, unsigned short* w, int n) {\n"
        "  const int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  if (i >= n) return;\n"
        "  const unsigned int m = q::magnitude_bits(x[i]);\n"
        "  const float inv = q::inverse_scale(m), scale = q::stored_scale(m);\n"
        "  codes[2 * i] = q::quantize_signed(x[i], inv);\n"
        "  codes[2 * i + 1] = q::quantize_unsigned(x[i], inv);\n"
        "  out[i] = q::dequantize_signed(codes[2 * i], scale) + q::dequantize_unsigned(codes[2 * i + 1], scale);\n"
        "  const unsigned int key = q::sr_key(q::sr_tensor_key(1u, 2u, q::kStreamParam), 3.0f);\n"
        "  w[i] = q::stochastic_round_bf16(out[i], q::sr_bits(q::sr_index_key(key, i), i));\n"
        "  out[i] += q::bf16_to_float(w[i]);\n"
        "}\n")
    cmd = [nvcc, "-std=c++17", "-fmad=false", "-arch=sm_90", "-I", str(HEADER_DIR), "-c", str(source), "-o",
           str(tmp_path / "quant_math_device.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
