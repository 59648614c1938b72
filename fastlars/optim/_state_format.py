"""How an optimizer stores each parameter's state buffers: fp32, bf16 or blockwise int8.

The format itself (code maps, blocks, rounding, the ``state_format`` record) is specified in
:mod:`fastlars.backends.quantization`; this module applies it to an optimizer's ``state`` dicts:

* :func:`target_dtype`: the state dtype a parameter gets from its group's ``state_dtype`` and
  ``min_quantized_size``, the trust-ratio rule (groups that do not adapt keep fp32) and a
  per-parameter override;
* :func:`new_entry`: zero buffers in that dtype (int8: uint8 codes + ``name_absmax`` scales);
* :func:`buffer_view`: what a backend receives for one buffer (a tensor, or a
  :class:`~fastlars.backends.quantization.QuantizedBuffer` over the codes and scales);
* :func:`convert_entry`: one parameter's saved state in another dtype, going through fp32 (a saved
  entry already in the target format is copied unchanged, so resuming is exact).

"fp32" means full-precision state as fastlars always kept it: fp32 when the parameter is fp32 or keeps
an fp32 master, else the parameter's own dtype (a bf16 parameter without a master has bf16 moments).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastlars.backends import quantization as q

BUFFER_MAPS: dict[str, q.CodeMap] = {
    "exp_avg": q.SIGNED_MAP,
    "exp_avg_sq": q.UNSIGNED_MAP,
    "momentum_buffer": q.SIGNED_MAP,
}
"""The code map of each int8 buffer: signed for LAMB's m and LARS's momentum, unsigned for v."""

KNOWN_MAPS = q.CODE_MAPS


def target_dtype(group: Mapping[str, Any], numel: int, adapts: bool, override: str | None = None) -> str:
    """The state dtype of a parameter of ``numel`` elements (the WHOLE tensor's count) in ``group``."""
    return q.resolve_state_dtype(group["state_dtype"], numel, adapts=adapts,
                                 min_quantized_size=group["min_quantized_size"], override=override)


def entry_dtype(entry: Mapping[str, Any]) -> str:
    """The state dtype a state entry is stored in ("fp32" when it carries no ``state_format`` record;
    the record must have passed :func:`~fastlars.backends.quantization.validate_record`)."""
    record = entry.get(q.FORMAT_KEY)
    return "fp32" if record is None else str(record["dtype"])


def full_precision_dtype(param: Tensor, keeps_master: bool) -> torch.dtype:
    """The dtype of "fp32" state: fp32 with a master or an fp32 param, else the param's dtype."""
    return torch.float32 if keeps_master else param.dtype


def pack(values: Mapping[str, Tensor], dtype: str, param: Tensor, keeps_master: bool) -> dict[str, Any]:
    """State entries holding fp32 ``values`` (buffer name → tensor of the param's shape) as ``dtype``."""
    if dtype == "fp32":
        want = full_precision_dtype(param, keeps_master)
        return {name: x.to(want).clone(memory_format=torch.preserve_format) for name, x in values.items()}
    return q.pack_state(values, dtype, {name: BUFFER_MAPS[name] for name in values})


def new_entry(param: Tensor, buffer_names: tuple[str, ...], dtype: str, keeps_master: bool) -> dict[str, Any]:
    """Zero state buffers for ``param`` stored as ``dtype`` (codes and scales for int8)."""
    if dtype == "int8":
        out: dict[str, Any] = {}
        for name in buffer_names:
            buf = q.QuantizedBuffer.zeros_like(param, BUFFER_MAPS[name])
            out[name], out[name + q.ABSMAX_SUFFIX] = buf.codes, buf.absmax
        out[q.FORMAT_KEY] = q.format_record("int8", {name: BUFFER_MAPS[name] for name in buffer_names})
        return out
    want = torch.bfloat16 if dtype == "bf16" else full_precision_dtype(param, keeps_master)
    out = {name: torch.zeros_like(param, dtype=want, memory_format=torch.preserve_format) for name in buffer_names}
    if dtype == "bf16":
        out[q.FORMAT_KEY] = q.format_record("bf16")
    return out


def buffer_view(entry: Mapping[str, Any], name: str) -> Tensor | q.QuantizedBuffer:
    """What a backend updates for buffer ``name``: the tensor itself, or int8 codes with their scales."""
    record = entry.get(q.FORMAT_KEY)
    if record is None or record["dtype"] != "int8":
        return entry[name]
    return q.QuantizedBuffer(entry[name], entry[name + q.ABSMAX_SUFFIX], KNOWN_MAPS[record["maps"][name]],
                             record["block_size"])


def expected_keys(entry: Mapping[str, Any], buffer_names: tuple[str, ...]) -> set[str]:
    """The buffer keys (besides ``step`` and ``master_param``) a saved entry must hold for its format."""
    keys = set(buffer_names)
    dtype = entry_dtype(entry)
    if dtype != "fp32":
        keys.add(q.FORMAT_KEY)
    if dtype == "int8":
        keys.update(name + q.ABSMAX_SUFFIX for name in buffer_names)
    return keys


def check_entry(entry: Mapping[str, Any], buffer_names: tuple[str, ...], param: Tensor, where: str) -> None:
    """Validate a saved entry's buffers against its (already validated) record: ValueError naming the key,
    the parameter (``where``) and the problem."""
    dtype = entry_dtype(entry)
    for name in buffer_names:
        value = entry[name]
        if not isinstance(value, Tensor):
            raise ValueError(f"state[{name!r}] of {where} must be a tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(f"state[{name!r}] of {where} has shape {tuple(value.shape)}, "
                             f"expected {tuple(param.shape)}")
        if dtype == "int8":
            if value.dtype != torch.uint8:
                raise ValueError(f"state[{name!r}] of {where} holds int8 codes and must be uint8, got {value.dtype}")
            key = name + q.ABSMAX_SUFFIX
            scale = entry[key]
            layout = q.block_layout(param.shape, entry[q.FORMAT_KEY]["block_size"])
            if (not isinstance(scale, Tensor) or scale.dtype != torch.float32
                    or tuple(scale.shape) != layout.scale_shape):
                got = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, Tensor) else type(scale).__name__
                raise ValueError(f"state[{key!r}] of {where} must be fp32 of shape {layout.scale_shape}, got {got}")
        elif not value.is_floating_point():
            raise ValueError(f"state[{name!r}] of {where} must be a floating tensor, got {value.dtype}")


def convert_entry(entry: Mapping[str, Any], buffer_names: tuple[str, ...], dtype: str, param: Tensor,
                  keeps_master: bool) -> dict[str, Any]:
    """The buffers of a (validated) state entry stored as ``dtype`` on the param's device.

    An entry already in ``dtype`` (int8: the same block size and maps) is copied as it is, so a resumed
    run continues bit for bit; otherwise the values go through fp32 (int8 → fp32 is exact, fp32 → int8
    and fp32 → bf16 round once).
    """
    device = param.device
    if entry_dtype(entry) == dtype and (dtype != "int8" or _same_int8_format(entry, buffer_names)):
        out = {}
        for key in expected_keys(entry, buffer_names):
            value = entry[key]
            if isinstance(value, Tensor):
                want = full_precision_dtype(param, keeps_master) if dtype == "fp32" else value.dtype
                value = value.to(device=device, dtype=want).clone(memory_format=torch.preserve_format)
            else:
                value = dict(value)
            out[key] = value
        return out
    moved = {key: (v.to(device) if isinstance(v, Tensor) else v) for key, v in entry.items()}
    values = q.unpack_state(moved, buffer_names, KNOWN_MAPS)
    return pack(values, dtype, param, keeps_master)


def _same_int8_format(entry: Mapping[str, Any], buffer_names: tuple[str, ...]) -> bool:
    record = entry[q.FORMAT_KEY]
    return record.get("block_size") == q.BLOCK_SIZE and all(
        record.get("maps", {}).get(name) == BUFFER_MAPS[name].name for name in buffer_names)


def buffer_keys(buffer_names: tuple[str, ...]) -> set[str]:
    """Every state key a buffer may occupy in any format (to drop them before a conversion)."""
    return {*buffer_names, *(name + q.ABSMAX_SUFFIX for name in buffer_names), q.FORMAT_KEY}
