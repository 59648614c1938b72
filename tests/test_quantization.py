"""The low-precision state format (fastlars/backends/quantization.py): block layout, code maps, special
blocks, shard invariance, the stochastic-rounding RNG, the per-parameter dtype rule, state_dict records
and conversions, and memory accounting (fastlars/memory.py)."""

from __future__ import annotations

import io
import itertools
import math
from fractions import Fraction

import pytest
import torch

from fastlars.backends import quantization as q
from fastlars.memory import optimizer_memory, state_memory

MAPS = [q.SIGNED_MAP, q.UNSIGNED_MAP]
SHAPES = [(1,), (255,), (256,), (257,), (4095,), (4096,), (4097,), (301, 1001), (3, 5, 7, 11)]


def _values(shape: tuple[int, ...], code_map: q.CodeMap, seed: int = 0) -> torch.Tensor:
    """Moment-like data: Gaussian (m) or its square (v), with scales spread over rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[:1] + (1,) * (len(shape) - 1), generator=gen))
    return x if code_map.signed else x * x


# ------------------------------------------------------------------------------------- layout
def test_block_layout_cuts_rows_into_blocks() -> None:
    assert q.block_layout((4097,)).scale_shape == (1, 17)
    assert q.block_layout((64, 300)).scale_shape == (64, 2)
    assert q.block_layout((40, 16, 3, 3)).scale_shape == (40, 1)
    assert q.block_layout(()).scale_shape == (1, 1)
    assert q.block_layout((0,)).scale_shape == (1, 0)
    assert q.block_layout((0, 5)).scale_shape == (0, 1)
    with pytest.raises(ValueError, match="block"):
        q.block_layout((10,), block=0)


@pytest.mark.parametrize("code_map", MAPS, ids=lambda m: m.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip(code_map: q.CodeMap, shape: tuple[int, ...]) -> None:
    """Shapes, dtypes, relative error, exact absmax and idempotence: re-quantising what a buffer decodes
    to gives the same codes and scales (a stored state does not drift when nothing changes)."""
    x = _values(shape, code_map)
    codes, absmax = q.quantize_blockwise(x, code_map)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and tuple(absmax.shape) == q.block_layout(shape).scale_shape
    decoded = q.dequantize_blockwise(codes, absmax, code_map)
    error = float((decoded - x).norm() / x.norm())
    assert error < 0.02, f"relative error {error:.3g}"
    assert decoded.abs().max() == x.abs().max()  # the block maximum decodes exactly
    again = q.quantize_blockwise(decoded, code_map)
    assert torch.equal(again[0], codes) and torch.equal(again[1], absmax)


def test_ragged_blocks_are_independent() -> None:
    """A row's ragged last block quantises as if alone; blocks never span rows."""
    x = _values((3, 300), q.SIGNED_MAP)
    codes, absmax = q.quantize_blockwise(x, q.SIGNED_MAP)
    for r in range(3):
        tail_codes, tail_scale = q.quantize_blockwise(x[r, 256:].clone(), q.SIGNED_MAP)
        assert torch.equal(codes[r, 256:], tail_codes) and absmax[r, 1] == tail_scale[0, 0]
        head_codes, _ = q.quantize_blockwise(x[r, :256].clone(), q.SIGNED_MAP)
        assert torch.equal(codes[r, :256], head_codes)


def test_dim0_shards_quantise_like_the_whole_tensor() -> None:
    """FSDP2-style dim-0 shards (uneven, any world size) give exactly the whole tensor's codes and
    scales; a 1-d tensor does when its shard offsets are multiples of the block."""
    x = _values((10, 300), q.SIGNED_MAP)
    codes, absmax = q.quantize_blockwise(x, q.SIGNED_MAP)
    layout = q.block_layout(x.shape)
    for bounds in ([0, 4, 8, 10], [0, 3, 6, 9, 10], [0, 10]):
        for lo, hi in itertools.pairwise(bounds):
            part_codes, part_scale = q.quantize_blockwise(x[lo:hi].clone(), q.SIGNED_MAP)
            assert torch.equal(part_codes, codes[lo:hi]) and torch.equal(part_scale, absmax[lo:hi])
            assert q.range_keeps_blocks(layout, lo * 300, hi * 300)
    flat = x.reshape(-1)
    flat_codes, _ = q.quantize_blockwise(flat, q.SIGNED_MAP)
    part, _ = q.quantize_blockwise(flat[512:1024].clone(), q.SIGNED_MAP)
    assert torch.equal(part, flat_codes[512:1024])
    flat_layout = q.block_layout(flat.shape)
    assert q.range_keeps_blocks(flat_layout, 512, 1024) and q.range_keeps_blocks(flat_layout, 2816, 3000)
    assert not q.range_keeps_blocks(flat_layout, 100, 1024)
    assert not q.range_keeps_blocks(layout, 150, 300)  # mid-row, mid-block
    assert q.range_keeps_blocks(layout, 256, 300)      # mid-row at a block boundary


def test_channels_last_blocks_follow_memory_order() -> None:
    """A channels_last tensor's rows are cut in memory order; codes keep the memory format."""
    x = _values((8, 40, 3, 3), q.SIGNED_MAP).contiguous(memory_format=torch.channels_last)
    codes, absmax = q.quantize_blockwise(x, q.SIGNED_MAP)
    assert codes.stride() == x.stride()
    memory_order = x.permute(0, 2, 3, 1).contiguous()
    want_codes, want_scale = q.quantize_blockwise(memory_order, q.SIGNED_MAP)
    assert torch.equal(codes.permute(0, 2, 3, 1), want_codes) and torch.equal(absmax, want_scale)
    decoded = q.dequantize_blockwise(codes, absmax, q.SIGNED_MAP)
    assert decoded.stride() == x.stride()
    assert torch.equal(decoded.permute(0, 2, 3, 1), q.dequantize_blockwise(want_codes, want_scale, q.SIGNED_MAP))


def test_special_blocks() -> None:
    """Zero and subnormal blocks store scale 0 and codes 0; non-finite blocks store NaN and decode to
    NaN; other blocks are untouched by their neighbours' specials."""
    x = torch.randn(6, 256)
    x[0] = 0.0
    x[1] = torch.full((256,), 1e-40)
    x[2, 7] = float("nan")
    x[3, 9] = float("inf")
    x[4, 0] = -float("inf")
    for code_map in MAPS:
        codes, absmax = q.quantize_blockwise(x, code_map)
        assert absmax[0, 0] == 0 and absmax[1, 0] == 0 and torch.isnan(absmax[2:5, 0]).all()
        assert (codes[:5] == 0).all()
        decoded = q.dequantize_blockwise(codes, absmax, code_map)
        assert (decoded[:2] == 0).all() and torch.isnan(decoded[2:5]).all() and torch.isfinite(decoded[5]).all()
        assert absmax[5, 0] == x[5].abs().max()


def test_dequantize_checks_the_scale_shape() -> None:
    codes, absmax = q.quantize_blockwise(torch.randn(4, 300), q.SIGNED_MAP)
    with pytest.raises(ValueError, match="absmax"):
        q.dequantize_blockwise(codes, absmax[:, :1], q.SIGNED_MAP)


# ------------------------------------------------------------------------------------ code maps
def test_code_maps_are_monotone_and_round_trip() -> None:
    """Every code the encoder can produce decodes to a value that encodes back to it; values grow with
    the code (int8 order for the signed map) and span [-1, 1] / [0, 1]."""
    signed = q.SIGNED_MAP.values[torch.arange(-127, 128).to(torch.int8).view(torch.uint8).long()]
    assert bool((signed[1:] > signed[:-1]).all()) and signed[0] == -1 and signed[-1] == 1
    assert bool((q.UNSIGNED_MAP.values[1:] > q.UNSIGNED_MAP.values[:-1]).all())
    assert q.UNSIGNED_MAP.values[0] == 0 and q.UNSIGNED_MAP.values[-1] == 1
    produced = torch.arange(-127, 128).to(torch.int8).view(torch.uint8)
    assert torch.equal(q.SIGNED_MAP.encode(q.SIGNED_MAP.decode(produced)), produced)
    codes = torch.arange(256).to(torch.uint8)
    assert torch.equal(q.UNSIGNED_MAP.encode(q.UNSIGNED_MAP.decode(codes)), codes)


def test_signed_map_is_odd_and_never_writes_negative_zero() -> None:
    y = torch.linspace(-1, 1, 10_001)
    plus, minus = q.SIGNED_MAP.encode(y).view(torch.int8), q.SIGNED_MAP.encode(-y).view(torch.int8)
    assert torch.equal(plus, -minus)
    assert 0x80 not in q.SIGNED_MAP.encode(torch.cat([y, -torch.tensor([0.0, 1e-30])])).tolist()


def test_sqrt_rn_is_correctly_rounded() -> None:
    """The spec's square root is the fp32 value nearest to √x, checked in exact rational arithmetic
    against both fp32 neighbours."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(500, generator=gen) * 10.0 ** torch.randint(-30, 30, (500,), generator=gen)).float()
    root = q.sqrt_rn(x)
    neighbours = [torch.nextafter(root, torch.tensor(0.0)), torch.nextafter(root, torch.tensor(math.inf))]
    for i in range(x.numel()):
        xi = Fraction(float(x[i]))
        best = abs(Fraction(float(root[i])) ** 2 - xi)
        assert all(best <= abs(Fraction(float(n[i])) ** 2 - xi) for n in neighbours)


# ------------------------------------------------------------------------------------- RNG / SR
def _bits(seed: int = 7, tensor: int = 3, stream: int = q.STREAM_PARAM, step: float = 5.0, n: int = 4096,
          offset: int = 0) -> torch.Tensor:
    key = q.sr_key(q.sr_tensor_key(seed, tensor, stream), torch.tensor(step))
    return q.sr_bits(key, torch.arange(offset, offset + n, dtype=torch.int64))


def test_rng_is_a_function_of_its_key_and_index() -> None:
    base = _bits()
    assert torch.equal(base, _bits()) and bool((base >= 0).all()) and bool((base < 2**32).all())
    for other in (_bits(seed=8), _bits(tensor=4), _bits(stream=1), _bits(step=6.0)):
        assert (other == base).float().mean() < 0.01
    assert torch.equal(_bits(n=1000, offset=3000), base[3000:4000])  # a shard draws the whole tensor's bits


def test_element_indices_follow_storage_order_and_shard_offsets() -> None:
    x = torch.zeros(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    idx = q.element_indices(x, offset=100)
    assert torch.equal(idx.permute(0, 2, 3, 1).reshape(-1), torch.arange(100, 124))


@pytest.mark.parametrize("x", [1.0 + 2.0**-10, math.pi, -math.e, 1.2345e-3, 3.3e38, 1e-40, 7e-39])
def test_stochastic_rounding_is_unbiased(x: float) -> None:
    """The mean of 2^16 draws (one per element index) is x within 5 standard errors; every draw is one
    of the two bf16 neighbours of x."""
    n = 2**16
    xs = torch.full((n,), x, dtype=torch.float32)
    rounded = q.stochastic_round_bf16(xs, _bits(n=n)).double()
    values = torch.unique(rounded)
    assert values.numel() == 2
    lo, hi = float(values[0]), float(values[1])
    exact = float(xs[0])
    assert lo < exact < hi
    p = (exact - lo) / (hi - lo)
    standard_error = (hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(float(rounded.mean()) - exact) <= 5 * standard_error


def test_stochastic_rounding_edges() -> None:
    """bf16-representable values, zeros and infinities are kept; NaN becomes the quiet NaN."""
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.3895313892515355e38, float("inf"), float("-inf")])
    bits = torch.tensor([2**32 - 1] * exact.numel(), dtype=torch.int64)
    out = q.stochastic_round_bf16(exact, bits)
    assert torch.equal(out.float(), exact) and torch.equal(torch.signbit(out.float()), torch.signbit(exact))
    nan = q.stochastic_round_bf16(torch.tensor([float("nan")]), torch.tensor([12345]))
    assert nan.view(torch.int16).item() == 0x7FC0


# ------------------------------------------------------------------------------- dtype rule
def test_resolve_state_dtype() -> None:
    assert q.resolve_state_dtype("int8", 4096, adapts=True) == "int8"
    assert q.resolve_state_dtype("int8", 4095, adapts=True) == "fp32"
    assert q.resolve_state_dtype("bf16", 10**6, adapts=False) == "fp32"
    assert q.resolve_state_dtype("int8", 10, adapts=True, min_quantized_size=0) == "int8"
    assert q.resolve_state_dtype("fp32", 10**6, adapts=True, override="bf16") == "bf16"
    with pytest.raises(ValueError, match="state_dtype"):
        q.resolve_state_dtype("int4", 10, adapts=True)
    with pytest.raises(ValueError, match="override"):
        q.resolve_state_dtype("fp32", 10, adapts=True, override="fp16")
    with pytest.raises(ValueError, match="min_quantized_size"):
        q.resolve_state_dtype("int8", 10, adapts=True, min_quantized_size=-1)


# ------------------------------------------------------------------------------- state_dict
LAMB_MAPS = {"exp_avg": q.SIGNED_MAP, "exp_avg_sq": q.UNSIGNED_MAP}


def _saved_and_loaded(entry: dict) -> dict:
    buffer = io.BytesIO()
    torch.save({"state": {0: entry}}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["state"][0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_state_entries_save_load_and_convert(dtype: str) -> None:
    """Every format packs, survives torch.save/torch.load(weights_only=True) unchanged, describes
    itself, and converts to every other format through fp32 (int8 → fp32 exactly)."""
    m, v = _values((64, 300), q.SIGNED_MAP), _values((64, 300), q.UNSIGNED_MAP)
    entry = q.pack_state({"exp_avg": m, "exp_avg_sq": v}, dtype, LAMB_MAPS)
    loaded = _saved_and_loaded(entry)
    assert set(loaded) == set(entry)
    for key, value in entry.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
        else:
            assert loaded[key] == value
    if dtype == "int8":
        assert loaded["state_format"] == {"version": 1, "dtype": "int8", "block_size": 256, "layout": "rows",
                                          "scale": "absmax_fp32",
                                          "maps": {"exp_avg": "mitchell4_signed", "exp_avg_sq": "mitchell8_unsigned"}}
        assert loaded["exp_avg"].dtype == torch.uint8 and loaded["exp_avg_absmax"].shape == (64, 2)
    values = q.unpack_state(loaded, ("exp_avg", "exp_avg_sq"), q.CODE_MAPS)
    tolerance = {"fp32": 0.0, "bf16": 4e-3, "int8": 0.02}[dtype]
    assert float((values["exp_avg"] - m).norm() / m.norm()) <= tolerance
    for target in ("fp32", "bf16", "int8"):
        converted = q.pack_state(values, target, LAMB_MAPS)
        again = q.unpack_state(converted, ("exp_avg", "exp_avg_sq"), q.CODE_MAPS)
        if target == "fp32" or target == dtype:  # fp32 keeps the values; the same format reproduces them
            assert torch.equal(again["exp_avg"], values["exp_avg"])


def test_unpack_rejects_unknown_records() -> None:
    entry = q.pack_state({"exp_avg": torch.randn(8, 300)}, "int8", {"exp_avg": q.SIGNED_MAP})
    for bad, match in (({"version": 2}, "version"), ({"dtype": "int4"}, "dtype"),
                       ({"maps": {"exp_avg": "dynamic_tree_signed"}}, "dynamic_tree_signed"),
                       ({"block_size": 0}, "block_size"), ({"layout": "flat"}, "layout")):
        broken = {**entry, "state_format": {**entry["state_format"], **bad}}
        with pytest.raises(ValueError, match=match):
            q.unpack_state(broken, ("exp_avg",), q.CODE_MAPS)
    with pytest.raises(ValueError, match="code map"):
        q.pack_state({"exp_avg": torch.randn(8, 300)}, "int8", {})
    with pytest.raises(ValueError, match="state dtype"):
        q.pack_state({"exp_avg": torch.randn(8, 300)}, "int4")


# ---------------------------------------------------------------------------------- memory
def test_memory_is_measured_from_the_tensors() -> None:
    """A 4096-element bf16 parameter with an fp32 master and int8 LAMB state: 2 (param) + 2 (grad) +
    4 (master) + 2·(1 + 4/256) (codes and scales) bytes per element, plus the step counter."""
    p = torch.zeros(16, 256, dtype=torch.bfloat16)
    p.grad = torch.zeros_like(p)
    state = {"step": torch.zeros(()), "master_param": torch.zeros(16, 256),
             "exp_avg": q.QuantizedBuffer.zeros_like(p, q.SIGNED_MAP),
             "exp_avg_sq": q.QuantizedBuffer.zeros_like(p, q.UNSIGNED_MAP), "state_format": {"dtype": "int8"}}
    report = state_memory([p], [state])
    assert report.parameters == 4096 and report.param_bytes == 8192 and report.grad_bytes == 8192
    assert report.state_bytes_by_key == {"step": 4, "master_param": 16384, "exp_avg": 4096 + 64,
                                         "exp_avg_sq": 4096 + 64}
    assert report.bytes_per_parameter == pytest.approx((8192 * 2 + 16384 + 2 * 4160 + 4) / 4096)
    view = p.view(-1)  # a second view of the same storage is not counted twice
    assert state_memory([p, view], [{}, {}], include_grads=False).param_bytes == 8192


def test_optimizer_memory_of_fp32_lamb() -> None:
    import fastlars

    params = [torch.nn.Parameter(torch.zeros(100, 30)), torch.nn.Parameter(torch.zeros(30))]
    opt = fastlars.LAMB(params, lr=1e-3, backend="reference")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    report = optimizer_memory(opt)
    assert report.parameters == 3030 and report.state_bytes_by_key["exp_avg"] == 3030 * 4
    assert report.bytes_per_parameter == pytest.approx(16 + 8 / 3030)


def test_code_maps_are_monotone_exact_at_one_and_near_the_roots() -> None:
    """The Mitchell maps: codes decode to increasing magnitudes, 0 and ±1 exactly, every code's value
    encodes back to that code (the clamped −128 byte aside), and the companding lies between the roots
    a^(1/4), a^(1/8) and 6.1% above them (Mitchell's logarithm errs by at most 0.086 in log2)."""
    magnitudes = q.SIGNED_MAP.values[:128]
    assert bool((magnitudes[1:] > magnitudes[:-1]).all()) and float(magnitudes[0]) == 0.0
    assert float(magnitudes[127]) == 1.0 and float(q.SIGNED_MAP.values[129]) == -1.0
    assert bool((q.UNSIGNED_MAP.values[1:] > q.UNSIGNED_MAP.values[:-1]).all())
    assert float(q.UNSIGNED_MAP.values[0]) == 0.0 and float(q.UNSIGNED_MAP.values[255]) == 1.0
    codes = torch.arange(256).to(torch.uint8)
    assert torch.equal(q.UNSIGNED_MAP.encode(q.UNSIGNED_MAP.values), codes)
    back = q.SIGNED_MAP.encode(q.SIGNED_MAP.values)
    assert torch.equal(back[codes != 128], codes[codes != 128]) and int(back[128]) == 129
    a = torch.logspace(-30, 0, 10001, dtype=torch.float64).float()
    for shift in (2, 3):
        ratio = q.mitchell_compand(a, shift).double() / a.double() ** (1.0 / 2**shift)
        assert 1.06 < float(ratio.max()) <= 2**0.086 and float(ratio.min()) >= 1 - 1e-6
