"""What each native CUDA chunk kernel (csrc/cuda/*.cu) reads and writes per element: its main arrays and their
dtypes, by kernel and template arguments, and how many 16-byte accesses one vector iteration of them makes.

The kernels move every main array 16 bytes per access; one vector iteration of a kernel whose params are T covers
16 / sizeof(T) elements (4 for fp32, 8 for bf16/fp16), so a T array takes one access per iteration and an fp32
array beside 16-bit params (masters, optimizer state) two. tests/test_cuda_sass.py counts the LDG.E.128 /
STG.E.128 instructions of the sm_90 SASS against this table; tests/test_native_cuda.py counts the accesses of
emulated steps against it.
"""

from __future__ import annotations

from typing import NamedTuple

BYTES = {"float": 4, "__nv_bfloat16": 2, "__half": 2}
"""Element types of the kernels' template arguments, by their C++ names, and their sizes."""


class Kernel(NamedTuple):
    name: str
    param: str  # T, the param and grad dtype
    master: bool | None = None  # fp32 master weights (then the optimizer state is fp32 too)
    from_moments: bool | None = None  # lamb_pass2: the moments pass 1 stored are read back, g is not

    def label(self) -> str:
        args = [self.param] + [str(a).lower() for a in (self.master, self.from_moments) if a is not None]
        return f"{self.name}<{', '.join(args)}>"


def stores_moments(param: str, master: bool) -> bool:
    """lamb.cu's kStoreMoments: pass 1 writes the new moments when they are fp32."""
    return master or param == "float"


def instantiations() -> list[Kernel]:
    """Every chunk kernel the CUDA build instantiates (the per-tensor reductions touch no main array)."""
    out = []
    for t in BYTES:
        out.append(Kernel("sumsq_kernel", t))
        for m in (False, True):
            out += [Kernel("lars_pass1", t, m), Kernel("lars_pass2", t, m), Kernel("lamb_pass1", t, m),
                    Kernel("lamb_pass2", t, m, False)]
            if stores_moments(t, m):
                out.append(Kernel("lamb_pass2", t, m, True))
    return out


def arrays(k: Kernel) -> tuple[list[str], list[str]]:
    """(dtypes of the arrays loaded, dtypes of the arrays stored) per element, in kernel order."""
    t = k.param
    state = "float" if k.master else t  # momentum / exp_avg / exp_avg_sq
    w = "float" if k.master else t  # the weights the maths reads: the master when kept
    masters = ["float"] if k.master else []
    if k.name == "sumsq_kernel":
        return [t], []
    if k.name == "lars_pass1":
        return [w], []
    if k.name == "lars_pass2":
        return [w, t, state], [state, *masters, t]
    if k.name == "lamb_pass1":
        return [w, t, state, state], [state, state] if stores_moments(t, k.master) else []
    if k.name == "lamb_pass2" and k.from_moments:
        return [w, state, state], [*masters, t]
    if k.name == "lamb_pass2":
        return [w, t, state, state], [state, state, *masters, t]
    raise ValueError(f"unknown kernel {k.name}")


def vector_elems(param: str) -> int:
    """Elements per thread per vector iteration: 16 bytes of the param dtype."""
    return 16 // BYTES[param]


def packs(dtypes: list[str], param: str) -> int:
    """16-byte accesses one vector iteration makes to arrays of these dtypes."""
    return sum(vector_elems(param) * BYTES[d] // 16 for d in dtypes)


# ------------------------------------------------------------------------ low-precision state (lowbit.cu)
# A warp owns one block of 256 elements at a time and lane l takes elements l + 32k (k < 8), so every access
# to a main array is ONE element of it per lane, coalesced over the warp into 32 consecutive elements: 32 B of
# int8 codes, 64 B of bf16/fp16 values, 128 B of fp32 values per warp instruction. A state buffer's format
# (lowbit_launch.h's StateFormat: fp32, bf16, fp16 or int8 codes) is read from the table at run time, so every
# kernel that touches state has the accesses of every format.
STATE_BYTES = {"float": 4, "__nv_bfloat16": 2, "__half": 2, "int8": 1}
"""Element sizes of a state buffer by its StateFormat (fp32, bf16, fp16, int8 codes)."""
LOWBIT_PER_LANE = 256 // 32
"""Elements of a block per lane (lowbit.cu's kPerLane), each its own access in the unrolled per-lane loops."""


class LowbitKernel(NamedTuple):
    name: str
    param: str | None = None  # T, the param and grad dtype (None: the per-tensor ratio kernels)
    master: bool | None = None  # fp32 master weights (read and written instead of the param's values)
    fused: bool | None = None  # lamb_lowbit_update: the whole step without adapt (weights written, r = 1)

    def label(self) -> str:
        args = [a for a in (self.param,) if a] + [str(a).lower() for a in (self.master, self.fused) if a is not None]
        return f"{self.name}<{', '.join(args)}>" if args else self.name


def lowbit_instantiations() -> list[LowbitKernel]:
    """Every kernel lowbit.cu instantiates: per param dtype and master, LAMB's pass 1 (and its fused variant
    without adapt) and pass 2, LARS's norm pass and update; one ratio kernel per algorithm."""
    out = [LowbitKernel("lamb_lowbit_ratios"), LowbitKernel("lars_lowbit_ratios")]
    for t in BYTES:
        for m in (False, True):
            out += [LowbitKernel("lamb_lowbit_update", t, m, False), LowbitKernel("lamb_lowbit_update", t, m, True),
                    LowbitKernel("lamb_lowbit_apply", t, m), LowbitKernel("lars_lowbit_norms", t, m),
                    LowbitKernel("lars_lowbit_update", t, m)]
    return out


def lowbit_arrays(k: LowbitKernel) -> tuple[list[str], list[str]]:
    """(element types loaded, element types stored) per element or block of a low-precision chunk kernel, one
    entry per array: "state" is a state buffer (every format of STATE_BYTES), "float" beside it its block
    scales (int8), or the per-chunk partial sums and per-tensor ratios. Every kernel also reads the 4-byte
    found_inf flag."""
    t = k.param
    w = "float" if k.master else t  # the weights the maths reads: the master when kept
    writes = ["float", t] if k.master else [t]  # master and param, or the param (bf16: by stochastic rounding)
    if k.name == "lars_lowbit_norms":  # Σw² (and Σg²) per chunk
        return [w, t], ["float"]
    if k.name == "lars_lowbit_update":  # momentum decoded, updated, stored; weights moved
        return [t, w, "state", "float"], ["state", "float", *writes]
    if k.name == "lamb_lowbit_update":  # pass 1: m, v stored; Σw², Σu² per chunk, or (fused) the weights
        return [t, w, "state", "float", "state", "float"], ["state", "float", "state", "float",
                                                            *(writes if k.fused else ["float"])]
    if k.name == "lamb_lowbit_apply":  # pass 2: u from the stored m, v; w ← w − lr·r·u
        return [w, "state", "float", "state", "float", "float"], writes
    raise ValueError(f"{k.name} has no main arrays")


def lowbit_access_bits(dtypes: list[str]) -> set[int]:
    """Bits of the one-element accesses to arrays of these element types (a state buffer: all its formats)."""
    out: set[int] = set()
    for d in dtypes:
        out |= {8 * b for b in STATE_BYTES.values()} if d == "state" else {8 * BYTES[d]}
    return out
