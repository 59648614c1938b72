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
