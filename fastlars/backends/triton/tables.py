"""Host side of the multi-tensor kernels: buckets of same-dtype tensors and their chunk tables.

A *bucket* is the set of entries (parameter i with its gradient, buffers, master) whose storage dtypes
agree and whose data pointers are all 16-byte aligned, or not, so one kernel specialisation serves all
of them: an ``aligned`` bucket guarantees every pointer in its table is a multiple of 16 bytes (and
chunk starts are multiples of the chunk size), which lets the kernels load and store 128-bit vectors;
entries with an unaligned view (a storage offset) go to a bucket of their own and take scalar accesses.
Its device-side table holds

* ``addr``: int64 [lists, n] data pointers (row per list: params, grads, buffers..., masters);
* ``numel``: int64 [n] element counts;
* ``chunk_tensor`` (int32) / ``chunk_start`` (int64): for chunk c, its tensor and first element;
  tensor i owns ceil(numel_i / CHUNK) consecutive chunks, empty tensors none;
* ``first_chunk``: int32 [n + 1], the chunk range of each tensor, for the per-tensor reductions;
* ``index``: int32 [n], the entry's position in the caller's lists (per-tensor norms and steps).

Tables are cached by (pointers, sizes): an optimizer passes the same tensors every step, so after
the first step nothing is copied to the device. A new table (first step, or gradients that moved) is
copied from pinned memory without blocking the host. Under CUDA-graph capture a new table is refused
(the graph would keep reading a host buffer that gets reused), and the tables a capture used are never
evicted, since the graph keeps their addresses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

_CACHE_SIZE = 64


@dataclass(frozen=True)
class Bucket:
    """One kernel launch's worth of tensors: their device tables and the dtype of each list."""

    dtypes: tuple[torch.dtype, ...]
    aligned: bool
    addr: Tensor
    numel: Tensor
    chunk_tensor: Tensor
    chunk_start: Tensor
    first_chunk: Tensor
    index: Tensor
    n_tensors: int
    n_chunks: int


_cache: OrderedDict[tuple, Bucket] = OrderedDict()
_captured: set[tuple] = set()
"""Keys of tables a CUDA graph captured: their device memory must outlive the graph, so never evicted."""


_checked_layouts: set[tuple] = set()
"""Entry layouts (each tensor's shape, strides and device) that passed _check_layout: a step over the same
tensors as the last one checks nothing again (the check costs ~10 µs an entry in Python, the lookup ~1)."""
_CHECKED_LAYOUTS_LIMIT = 1 << 16


def check_layout(entry: list[Tensor], where: int) -> None:
    """_check_layout, skipped for an entry whose shapes, strides and devices already passed it."""
    layout = tuple((t.shape, t.stride(), t.device) for t in entry)
    if layout in _checked_layouts:
        return
    _check_layout(entry, where)
    if len(_checked_layouts) >= _CHECKED_LAYOUTS_LIMIT:
        _checked_layouts.clear()
    _checked_layouts.add(layout)


def _check_layout(entry: list[Tensor], where: int) -> None:
    """Every tensor of an entry is dense with the layout of the first, so flat index k means the same element."""
    first = entry[0]
    for t in entry:
        if t.shape != first.shape:
            raise ValueError(
                f"triton backend: tensor {where} has shape {tuple(t.shape)}, its param {tuple(first.shape)}"
            )
        if t.device != first.device:
            raise ValueError(f"triton backend: tensor {where} is on {t.device}, its param on {first.device}")
        if t.numel() > 1 and not _dense(t):
            raise ValueError(
                f"triton backend: tensor {where} is not dense (strides {t.stride()}); pass contiguous tensors"
            )
        if t.numel() > 1 and t.stride() != first.stride():
            raise ValueError(f"triton backend: tensor {where} has strides {t.stride()}, its param {first.stride()}; "
                             "give gradients and state the layout of their parameter")


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the strides, sorted, are the running products of the sizes."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def buckets(lists: list[list[Tensor]], chunk: int) -> list[Bucket]:
    """Split entries i (one tensor from each list) into same-dtype buckets with cached device tables."""
    n = len(lists[0])
    device = lists[0][0].device
    groups: dict[tuple[tuple[torch.dtype, ...], bool], list[int]] = {}
    for i in range(n):
        entry = [lst[i] for lst in lists]
        check_layout(entry, i)
        aligned = all(t.data_ptr() % ALIGNMENT == 0 for t in entry)
        groups.setdefault((tuple(t.dtype for t in entry), aligned), []).append(i)
    return [_bucket(lists, dtypes, aligned, idx, chunk, device) for (dtypes, aligned), idx in groups.items()]


ALIGNMENT = 16
"""Bytes: an aligned bucket's pointers are multiples of this (one 128-bit vector)."""


def _bucket(lists: list[list[Tensor]], dtypes: tuple[torch.dtype, ...], aligned: bool, idx: list[int], chunk: int,
            device: torch.device) -> Bucket:
    ptrs = tuple(tuple(lst[i].data_ptr() for i in idx) for lst in lists)
    numels = tuple(lists[0][i].numel() for i in idx)
    key = (device, chunk, dtypes, aligned, ptrs, numels, tuple(idx))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        if capturing:
            _captured.add(key)
        return hit
    if capturing:
        raise RuntimeError("triton backend: these tensors have no device table yet and none can be built while a "
                           "CUDA graph is being captured; run one step outside the capture first (warm-up), and "
                           "keep gradients at fixed addresses (zero_grad(set_to_none=False))")
    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    first_chunk = [0]
    for j, numel in enumerate(numels):
        for start in range(0, numel, chunk):
            chunk_tensor.append(j)
            chunk_start.append(start)
        first_chunk.append(len(chunk_tensor))

    def on_device(values: object, dtype: torch.dtype) -> Tensor:
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":  # pinned: an asynchronous copy, no wait for the stream's queued work
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    bucket = Bucket(
        dtypes=dtypes,
        aligned=aligned,
        addr=on_device(list(ptrs), torch.int64),
        numel=on_device(list(numels), torch.int64),
        chunk_tensor=on_device(chunk_tensor or [0], torch.int32),
        chunk_start=on_device(chunk_start or [0], torch.int64),
        first_chunk=on_device(first_chunk, torch.int32),
        index=on_device(idx, torch.int32),
        n_tensors=len(idx),
        n_chunks=len(chunk_tensor),
    )
    _cache[key] = bucket
    for old in [k for k in _cache if k not in _captured][: max(0, len(_cache) - _CACHE_SIZE)]:
        del _cache[old]
    return bucket
