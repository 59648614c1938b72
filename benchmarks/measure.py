"""Timing, memory bandwidth and compulsory traffic.

Compulsory bytes of one step: read w (the fp32 master when kept), g and every state buffer; write w
(master and param when kept) and every state buffer. fp32 LAMB/AdamW: 28 B per element; LARS/SGD
with momentum: 20 B. Achieved bandwidth = compulsory bytes / median step time.

The CPU roofline is the best streaming bandwidth measured on the threads in use by the native probe
fastlars._C.stream_pass (fastest of its repeats) over arrays far beyond the caches, for three
read/write mixes: a read-only sum (4 B per element), an in-place x = c·x + z (12 B) and two
in-place arrays fed by a third (20 B, the traffic mix of a momentum step), with torch's in-place
x += y and torch's own fused CPU steps over one large tensor as further probes: SGD with momentum (20 B
per element) and AdamW (28 B), the peers the tables compare with. On a 2-core EPYC VM those fused steps
streamed up to 1.36× faster than the best of the others (2026-12-04), so without them the "roofline" was
not an upper bound. A step that moves its compulsory bytes cannot beat the best of them. The probes
(bandwidth_probes) run before and after a benchmark and, for every table of a set beyond the last-level
cache, as further cases of that table's interleaved rounds, so the roofline sees the same minutes of the
machine as the rows it bounds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Timing:
    """Step times in milliseconds over the timed repeats."""

    median: float
    low: float
    high: float
    repeats: int
    cpu_over_wall: float | None = None  # process CPU time / wall time over the timed repeats (CPU only)


def warm_up(fn: Callable[[], Any], device: torch.device, warmup: int = 3, budget_s: float | None = None) -> float:
    """Calls `fn` `warmup` times (the first may compile) and returns the last call's seconds. With
    `budget_s`, a call over budget_s / 5 ends the warm-up after two calls."""
    last = 0.0
    for i in range(warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        last = time.perf_counter() - t0
        if budget_s is not None and i >= 1 and last > budget_s / 5:
            break
    return last


def repeats_within(repeats: int, budget_s: float | None, last_s: float) -> int:
    """How many of `repeats` timed calls fit `budget_s` at `last_s` seconds a call: never fewer than 5, or
    3 when one call alone takes over budget_s / 5; all of them without a budget."""
    if budget_s is None:
        return repeats
    floor = 3 if last_s > budget_s / 5 else 5
    return max(min(repeats, floor), min(repeats, int(budget_s / max(last_s, 1e-9))))


def _timed_calls(fn: Callable[[], Any], device: torch.device, count: int) -> tuple[list[float], float, float]:
    """`count` calls of `fn`: their milliseconds (CUDA events on a GPU, perf_counter on the CPU), and the
    process CPU seconds and wall seconds they spanned."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, time.process_time() - cpu0, time.perf_counter() - wall0


def time_rounds(fns: list[Callable[[], Any]], repeats: list[int], device: torch.device,
                rounds: int = 1) -> list[Timing]:
    """Times warm functions side by side: `repeats[i]` calls of `fns[i]`, spread over `rounds` rounds; each
    round times every function for its share of calls, the order rotated by one each round. The speed of a
    shared machine drifts over minutes (this project's 2-core VM's memory bandwidth moved 1.7× between two
    runs four minutes apart), and timing one function after the other puts that drift into their ratio;
    interleaved, every function sees the same minutes. Returns each function's median, min and max over
    all its calls (with process CPU time / wall time over them on the CPU)."""
    if len(fns) != len(repeats):
        raise ValueError(f"{len(fns)} functions but {len(repeats)} repeat counts")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times: list[list[float]] = [[] for _ in fns]
    cpu = [0.0] * len(fns)
    wall = [0.0] * len(fns)
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            count = repeats[i] // rounds + (1 if r < repeats[i] % rounds else 0)
            if count == 0:
                continue
            ms, cpu_s, wall_s = _timed_calls(fns[i], device, count)
            times[i] += ms
            cpu[i] += cpu_s
            wall[i] += wall_s
    return [Timing(statistics.median(t), min(t), max(t), len(t),
                   cpu[i] / max(wall[i], 1e-9) if device.type == "cpu" else None)
            for i, t in enumerate(times)]


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 3,
            budget_s: float | None = None) -> Timing:
    """Time `fn` after `warmup` calls (warm_up): CUDA events around each call on a GPU, a monotonic host
    clock (perf_counter) on the CPU. Returns the median with the min and max. With `budget_s`, a slow `fn`
    gets fewer repeats (repeats_within)."""
    last = warm_up(fn, device, warmup, budget_s)
    count = repeats_within(repeats, budget_s, last) if warmup else repeats
    return time_rounds([fn], [count], device)[0]


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Large-array copy bandwidth of `device` in GB/s, counting the read and the write (2·nbytes per
    copy): 2 GiB on a GPU, 512 MiB on the CPU (beyond every cache)."""
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (512 << 20))
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * nbytes / (timing.median * 1e-3) / 1e9


def inplace_bandwidth_gbs(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """In-place stream bandwidth in GB/s: x += y over fp32 arrays of `nbytes` each, counting 3·nbytes
    (read x, read y, write x). An optimizer step updates its buffers in place like this; a copy into
    another array also pays a read-for-ownership of the destination on CPUs, which `copy_bandwidth_gbs`
    does not count, so a step can exceed 100% of "copy" on a CPU but not of this."""
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (512 << 20))
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.ones_like(x)
    timing = time_ms(lambda: x.add_(y), device, repeats, warmup=2)
    return 3 * nbytes / (timing.median * 1e-3) / 1e9


STREAM_MIXES = {"read": 4, "update": 12, "update2": 20}  # bytes moved per element by each probe mode


FUSED_PROBES = {"torch_fused_sgd": 20, "torch_fused_adamw": 28}  # bytes per element of each fused step


@dataclass(frozen=True)
class Probe:
    """One streaming probe of the CPU roofline: `step` moves `bytes_per_call` bytes through memory."""

    name: str
    step: Callable[[], Any]
    bytes_per_call: int

    def gbs(self, timing: Timing) -> float:
        """GB/s of the probe's fastest timed call."""
        return self.bytes_per_call / (timing.low * 1e-3) / 1e9


def _fused_probe(kind: str, weight: torch.nn.Parameter) -> Probe:
    """torch's fused CPU step over one fp32 parameter (its own state, the weight and gradient shared with
    other probes): ``torch_fused_sgd`` = SGD(momentum 0.9, fused) reads w, g, m and writes w, m (20 B per
    element); ``torch_fused_adamw`` = AdamW(fused) reads w, g, m, v and writes w, m, v (28 B)."""
    if kind == "torch_fused_sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD([weight], lr=1e-6, momentum=0.9, fused=True)
    elif kind == "torch_fused_adamw":
        opt = torch.optim.AdamW([weight], lr=1e-6, fused=True)
    else:
        raise ValueError(f"kind: unknown fused probe {kind!r}; choose from {', '.join(FUSED_PROBES)}")
    return Probe(kind, opt.step, FUSED_PROBES[kind] * weight.numel())


def _probe_weight(n: int) -> torch.nn.Parameter:
    weight = torch.nn.Parameter(torch.ones(n))
    weight.grad = torch.full((n,), 1e-3)
    return weight


def bandwidth_probes(nbytes: int = 128 << 20) -> list[Probe]:
    """The roofline's probes over fp32 arrays of `nbytes` each (default 4× a 32 MiB last-level cache), on
    torch.get_num_threads() threads when called: torch's in-place x += y ("torch_inplace", 12 B per
    element), torch's fused SGD and AdamW steps (FUSED_PROBES, one weight and gradient between them) and,
    with the compiled extension, each fastlars._C.stream_pass mix (STREAM_MIXES: one pass per call, the
    kernels' own chunking; over x, y and a third array). Nine arrays in all: the probes are timed beside
    the largest tables, whose cases already hold most of a 24 GiB machine."""
    from fastlars._extension import extension

    n = nbytes // 4
    x, y = torch.ones(n), torch.ones(n)
    weight = _probe_weight(n)
    probes = [Probe("torch_inplace", lambda: x.add_(y), 12 * n)]
    probes += [_fused_probe(kind, weight) for kind in FUSED_PROBES]
    ext = extension()
    if ext is not None and hasattr(ext, "stream_pass"):
        z = torch.ones(n)
        for mode, per_element in STREAM_MIXES.items():
            probes.append(Probe(mode, lambda m=mode: ext.stream_pass(x, y, z, mode=m, repeats=1), per_element * n))
    return probes


def fused_step_bandwidth_gbs(kind: str, nbytes: int = 128 << 20, repeats: int = 5) -> float:
    """GB/s of torch's fused CPU step `kind` (FUSED_PROBES) over one fp32 parameter of `nbytes`, fastest of
    `repeats` steps."""
    probe = _fused_probe(kind, _probe_weight(nbytes // 4))
    return probe.gbs(time_ms(probe.step, torch.device("cpu"), repeats, warmup=2))


def stream_bandwidths_gbs(nbytes: int = 128 << 20, repeats: int = 5) -> dict[str, float]:
    """GB/s of each bandwidth_probes probe on torch.get_num_threads() threads (fastest of `repeats` calls
    after two untimed ones: first touch, page faults)."""
    return {p.name: p.gbs(time_ms(p.step, torch.device("cpu"), repeats, warmup=2)) for p in bandwidth_probes(nbytes)}


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache level (Linux sysfs), 0 when unknown."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in os.listdir(base):
            try:
                with open(f"{base}/{index}/size") as f:
                    text = f.read().strip()
            except OSError:
                continue
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        return 0
    return max(sizes, default=0)


def best_roofline(*gbs: float | None) -> float | None:
    """A row's roofline: the highest of the probes that bound it (the run's, before and after the rows,
    and its table's, in its own rounds); None where none was probed."""
    return max((g for g in gbs if g), default=None)


def roofline_fraction(gb_per_s: float, roofline_gbs: float | None, host_overhead: bool) -> float | None:
    """Achieved / roofline bandwidth, or None where the roofline does not bound the row: no roofline
    measured, or a host-overhead set (`ParamSet.host_overhead`: a step over a few thousand parameters is
    host work, not memory traffic)."""
    if not roofline_gbs or host_overhead:
        return None
    return gb_per_s / roofline_gbs


def _bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def compulsory_bytes(params: list[Tensor], state: dict[str, list[Tensor]], masters: list[Tensor] | None) -> int:
    """Bytes one step must read and write at least (see the module docstring)."""
    grads = [p.grad for p in params]
    weights = masters if masters is not None else params
    buffers = [t for ts in state.values() for t in ts]
    read = _bytes(weights) + _bytes(grads) + _bytes(buffers)
    write = _bytes(weights) + _bytes(buffers) + (_bytes(params) if masters is not None else 0)
    return read + write


def state_lists(opt: torch.optim.Optimizer, params: list[Tensor], names: tuple[str, ...]) -> dict[str, list[Tensor]]:
    """The optimizer's state buffers `names` of each param, as lists."""
    return {n: [opt.state[p][n] for p in params] for n in names}


def masters(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor] | None:
    """fastlars' fp32 master copies (the param itself where none is kept), or None without any."""
    found = [opt.state[p].get("master_param") for p in params]
    return None if all(m is None for m in found) else [m if m is not None else p for m, p in zip(found, params)]
