"""The native CUDA kernels' sm_90 SASS (no GPU needed): 16-byte global loads and stores on every main array of
the fp32-state kernels, one element per lane on those of the low-precision-state kernels, and no spills.

csrc/cuda/{l2norm,lars,lamb,lowbit}.cu are compiled to sm_90 cubins with the toolkit and include dirs setup.py builds
with (its own functions, read from setup.py), torch's nvcc flags and setup.py's, then disassembled with the
cuobjdump in Triton's package. Per chunk-kernel instantiation (tests/cuda_accesses.py):

- the LDG.E.128 / STG.E.128 count is the number of 16-byte accesses one vector iteration makes to the kernel's
  arrays (one per bf16/fp16/fp32 array of the param dtype, two per fp32 array beside 16-bit params; the
  grad-norm kernel's unrolled loop has several copies of its one), and no 8-byte accesses remain;
- the scalar fallback (tails, views that are not 16-byte aligned) is there: one-element loads and stores of
  every element width the kernel's arrays have;
- registers do not spill (cuobjdump -res-usage: no local memory, at most 8 bytes of stack).

Per low-precision kernel of lowbit.cu (every instantiation there; tests/cuda_accesses.py, LowbitKernel):

- a warp owns a block of 256 elements and lane l takes elements l + 32k, so each access is one element of its
  array per lane (a warp instruction covers 32 consecutive elements): the element widths of the kernel's
  arrays are exactly the widths of its global accesses, none is 8 or 16 bytes, and int8 codes are loaded
  and stored one byte at a time (LDG.E.U8 / STG.E.U8: neighbouring lanes own neighbouring bytes, so a wider
  store would have to rewrite other lanes' codes);
- registers do not spill (no local memory, at most 8 bytes of stack): the per-lane arrays of a block's 8
  elements stay in registers;
- a lane's loads of a block are in flight together: at least 8 code bytes (the LARS norm pass: 8 loads) are
  issued before the first loaded value is used (loads_before_use, in program order).

Skipped with the reason where nvcc or Triton's cuobjdump is missing. About 20 s on 2 cores (nvcc 13.0, the four
files compiled side by side).
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cuda_accesses
import pytest
from cuda_accesses import Kernel, LowbitKernel

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["l2norm", "lars", "lamb", "lowbit"]
NVCC_FLAGS = ["-O3", "-lineinfo", "-fmad=false", "-std=c++20"]  # setup.py's nvcc flags; torch adds the standard
_MANGLED = re.compile(r"(sumsq_kernel|lars_pass1|lars_pass2|lamb_pass1|lamb_pass2)I(f|6__half|13__nv_bfloat16)"
                      r"((?:Lb[01]E)*)E")
_LOWBIT = re.compile(r"(lamb_lowbit_update|lamb_lowbit_apply|lars_lowbit_norms|lars_lowbit_update)"
                     r"I(f|6__half|13__nv_bfloat16)((?:Lb[01]E)*)E|\d+(lamb_lowbit_ratios|lars_lowbit_ratios)E")
_TYPES = {"f": "float", "6__half": "__half", "13__nv_bfloat16": "__nv_bfloat16"}
_ACCESS = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9]+)*)")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
_REGISTER = re.compile(r"\bR\d+\b")


def loads_before_use(instructions: list[str], modifier: str | None = None) -> int:
    """The most global loads (LDG, with `modifier` among its modifiers when given) issued from one such load up
    to the first instruction that reads the register it loads, that load included, in program order: how many
    loads a lane has in flight before it must wait for one. A lane that loads, uses and loads again scores 1."""
    ops = [_PREDICATE.sub("", i) for i in instructions]

    def counted(op: str) -> bool:
        return op.startswith("LDG") and (modifier is None or modifier in op.split()[0].split("."))

    best = 0
    for i, op in enumerate(ops):
        if not counted(op):
            continue
        target, issued = _REGISTER.findall(op)[0], 1
        for later in ops[i + 1:]:
            registers = _REGISTER.findall(later)
            if target in registers[1:] or (later.startswith("STG") and target in registers):
                break
            issued += counted(later)
        best = max(best, issued)
    return best


def _setup_functions() -> dict:
    """setup.py's toolkit and include-dir finders, without running setup.py (it calls setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    wanted = {"_has_runtime_header", "_find_cuda_home", "_cuda_include_dirs", "_nvidia_wheel_includes"}
    module = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted],
                        type_ignores=[])
    namespace = {"os": os, "sys": sys, "glob": glob, "shutil": shutil, "Path": Path}
    exec(compile(module, "setup.py", "exec"), namespace)
    return namespace


def _cuobjdump() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    tool = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if os.access(tool, os.X_OK) else None


def _kernel(mangled: str) -> Kernel | LowbitKernel | None:
    m = _MANGLED.search(mangled)
    if m is not None:
        flags = [b == "1" for b in re.findall(r"Lb([01])E", m.group(3))]
        return Kernel(m.group(1), _TYPES[m.group(2)], *flags)
    m = _LOWBIT.search(mangled)
    if m is None:
        return None  # a per-tensor reduction of l2norm/lars/lamb.cu: no main array
    if m.group(4):
        return LowbitKernel(m.group(4))
    flags = [b == "1" for b in re.findall(r"Lb([01])E", m.group(3))]
    return LowbitKernel(m.group(1), _TYPES[m.group(2)], *flags)


def _width(modifiers: str) -> int:
    """Bits of one access from its SASS modifiers (.128, .64, .U16; none: 32)."""
    mods = set(modifiers.split("."))
    for bits in (128, 64):
        if str(bits) in mods:
            return bits
    return 16 if mods & {"U16", "S16"} else 8 if mods & {"U8", "S8"} else 32


@pytest.fixture(scope="module")
def sass(tmp_path_factory: pytest.TempPathFactory) -> dict[Kernel | LowbitKernel, dict]:
    """Per chunk-kernel instantiation (Kernel) and low-precision kernel (LowbitKernel): Counter of (LDG|STG, bits)
    and the -res-usage figures."""
    setup = _setup_functions()
    home = setup["_find_cuda_home"]()
    cuobjdump = _cuobjdump()
    if home is None or not (Path(home) / "bin" / "nvcc").is_file():
        pytest.skip("no CUDA toolkit with nvcc (the one setup.py would build with)")
    if cuobjdump is None:
        pytest.skip("no cuobjdump in Triton's package (triton/backends/nvidia/bin)")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    os.environ["CUDA_HOME"] = home  # as setup.py sets it before asking for the include dirs
    includes = [f"-I{d}" for d in [str(ROOT / "csrc"), *setup["_cuda_include_dirs"]()]]
    out = tmp_path_factory.mktemp("sass")
    procs = {}
    for src in SOURCES:
        cmd = [str(Path(home) / "bin" / "nvcc"), "-cubin", "-arch=sm_90", *COMMON_NVCC_FLAGS, *NVCC_FLAGS, *includes,
               str(ROOT / "csrc" / "cuda" / f"{src}.cu"), "-o", str(out / f"{src}.cubin")]
        procs[src] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result: dict[Kernel | LowbitKernel, dict] = {}
    for src, proc in procs.items():
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"nvcc {src}.cu for sm_90 failed:\n{log[-4000:]}"
        cubin = str(out / f"{src}.cubin")
        text = subprocess.run([str(cuobjdump), "-sass", cubin], check=True, capture_output=True, text=True).stdout
        for block in re.split(r"\n\s*Function : ", text)[1:]:
            kernel = _kernel(block.split("\n", 1)[0])
            if kernel is not None:
                instructions = _INSTRUCTION.findall(block)
                result[kernel] = {"access": Counter((op, _width(mods)) for op, mods in _ACCESS.findall(block)),
                                  "loads_before_use": loads_before_use(instructions),
                                  "codes_before_use": loads_before_use(instructions, "U8")}
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin], check=True, capture_output=True, text=True)
        for name, figures in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage.stdout):
            kernel = _kernel(name)
            if kernel is not None:
                result[kernel]["res"] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", figures)}
    return result


def test_every_chunk_kernel_is_in_the_cubins(sass) -> None:
    assert {k for k in sass if isinstance(k, Kernel)} == set(cuda_accesses.instantiations())


@pytest.mark.parametrize("kernel", cuda_accesses.instantiations(), ids=Kernel.label)
def test_main_arrays_move_16_bytes_per_access(sass, kernel) -> None:
    found = sass[kernel]["access"]
    loads, stores = cuda_accesses.arrays(kernel)
    expected = (cuda_accesses.packs(loads, kernel.param), cuda_accesses.packs(stores, kernel.param))
    got = (found["LDG", 128], found["STG", 128])
    if kernel.name == "sumsq_kernel":  # its loop strides by the constant block size: nvcc unrolls it (7 or 31 copies)
        assert got[0] >= expected[0] and got[1] == expected[1], f"{kernel.label()}: {got}, expected {expected}"
    else:
        assert got == expected, f"{kernel.label()}: (LDG.E.128, STG.E.128) = {got}, expected {expected}"
    assert found["LDG", 64] == found["STG", 64] == 0, f"{kernel.label()}: 8-byte accesses remain"
    # the scalar path: at least one one-element access per array, of the array's element width
    for op, dtypes in (("LDG", loads), ("STG", stores)):
        for bits, arrays in Counter(8 * cuda_accesses.BYTES[d] for d in dtypes).items():
            assert found[op, bits] >= arrays, f"{kernel.label()}: no scalar {op} path for its {bits}-bit arrays"


@pytest.mark.parametrize("kernel", cuda_accesses.instantiations(), ids=Kernel.label)
def test_registers_do_not_spill_into_the_loop(sass, kernel) -> None:
    """No local arrays and at most 8 bytes of stack: ptxas keeps lamb_pass2<16-bit, true, true> at 40 registers
    (3 blocks of 512 threads per SM) by keeping lr on the stack (one store and one load per chunk)."""
    res = sass[kernel]["res"]
    assert res["LOCAL"] == 0 and res["STACK"] <= 8, f"{kernel.label()} spills: {res}"


# ------------------------------------------------------------------------------ lowbit.cu
_LOWBIT_CHUNK_KERNELS = [k for k in cuda_accesses.lowbit_instantiations() if k.param is not None]


def test_every_lowbit_kernel_is_in_the_cubin(sass) -> None:
    assert {k for k in sass if isinstance(k, LowbitKernel)} == set(cuda_accesses.lowbit_instantiations())


@pytest.mark.parametrize("kernel", _LOWBIT_CHUNK_KERNELS, ids=LowbitKernel.label)
def test_lowbit_arrays_move_one_element_per_lane(sass, kernel) -> None:
    """The global accesses of a low-precision kernel are exactly the element widths of its arrays (the state's
    formats, the params', the masters' and the 4-byte scales, partial sums, ratios and found_inf flag): one
    element per lane, none wider; int8 codes as single bytes, at least one load (and, where the state is
    written, one store) per element of a lane's 8 in a block and per state buffer (sm_90, nvcc 13: LAMB's
    passes load 32 code bytes, pass 1 stores 16; LARS's update loads 16 and stores 8)."""
    found = sass[kernel]["access"]
    loads, stores = cuda_accesses.lowbit_arrays(kernel)
    for op, dtypes in (("LDG", loads), ("STG", stores)):
        widths = {bits for (o, bits), n in found.items() if o == op and n}
        expected = cuda_accesses.lowbit_access_bits(dtypes) | ({32} if op == "LDG" else set())
        assert widths == expected, f"{kernel.label()}: {op} widths {sorted(widths)}, expected {sorted(expected)}"
    for op, dtypes in (("LDG", loads), ("STG", stores)):  # a byte per element of a lane's 8 in a block, per buffer
        least = cuda_accesses.LOWBIT_PER_LANE * dtypes.count("state")
        assert found[op, 8] >= least, f"{kernel.label()}: {found[op, 8]} byte {op}s of int8 codes, expected ≥ {least}"


@pytest.mark.parametrize("kernel", cuda_accesses.lowbit_instantiations(), ids=LowbitKernel.label)
def test_lowbit_registers_do_not_spill_into_the_loop(sass, kernel) -> None:
    """No local arrays (the w, m, v values of a lane's 8 elements of a block stay in registers through the
    block's absmax, its stores and the update) and at most 8 bytes of stack, as for the fp32-state kernels."""
    res = sass[kernel]["res"]
    assert res["LOCAL"] == 0 and res["STACK"] <= 8, f"{kernel.label()} spills: {res}"


@pytest.mark.parametrize("kernel", _LOWBIT_CHUNK_KERNELS, ids=LowbitKernel.label)
def test_lowbit_loads_of_a_block_are_in_flight_together(sass, kernel) -> None:
    """A lane issues the loads of its 8 elements of a block before it uses any (lowbit.cu: the format is looked
    at once per block, loads fill raw bits, decoding comes after). Before this layout each element's loads sat
    behind a switch on the format and were used before the next element's were issued: one code byte in flight
    per lane (the H200 run of 2026-12-04 moved 9-11% of copy bandwidth). The update and apply passes have the
    8 code bytes of a buffer in flight together; the LARS norm pass 8 weights (or weights and gradients)."""
    found = sass[kernel]
    if kernel.name == "lars_lowbit_norms":
        assert found["loads_before_use"] >= cuda_accesses.LOWBIT_PER_LANE, f"{kernel.label()}: {found}"
    else:
        assert found["codes_before_use"] >= cuda_accesses.LOWBIT_PER_LANE, f"{kernel.label()}: {found}"
