"""Builds fastlars._C: the C++ CPU kernels always, the CUDA kernels when nvcc and a CUDA build of
torch are present. Environment knobs:

  FASTLARS_CUDA=0/1      force the CUDA kernels off / on (on: fail loudly if they cannot be built)
  CUDA_HOME              the CUDA toolkit; when unset, the first toolkit holding
                         include/cuda_runtime.h among torch's guess, /usr/local/cuda and
                         /usr/local/cuda-* is used (a wrapper nvcc on PATH misleads torch's guess)
  TORCH_CUDA_ARCH_LIST   defaults to "8.0;9.0" when no GPU is visible
  MAX_JOBS               parallel compile jobs (default: the number of CPUs)

Needs only torch, setuptools, ninja and pybind11 at build time: install with
``pip install --no-build-isolation .``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _has_runtime_header(home: str | None) -> bool:
    return bool(home) and (Path(home) / "include" / "cuda_runtime.h").is_file()


def _find_cuda_home() -> str | None:
    """A CUDA toolkit directory holding include/cuda_runtime.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            for word in real.read_text(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(str(Path(word).parent.parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in candidates if _has_runtime_header(c)), None)


def _want_cuda() -> bool:
    import torch

    flag = os.environ.get("FASTLARS_CUDA", "").strip()
    possible = torch.version.cuda is not None and _find_cuda_home() is not None
    if flag == "0":
        return False
    if flag == "1":
        if not possible:
            sys.exit("FASTLARS_CUDA=1 but no CUDA build of torch or no CUDA toolkit (include/cuda_runtime.h) was found")
        return True
    return possible


def _cuda_include_dirs() -> list[str]:
    """The toolkit's headers first, then the nvidia-* wheels' as a fallback for headers the toolkit lacks
    (torch's CUDA headers include cusparse.h, ...); CUDAExtension would put the toolkit after ours."""
    home = os.environ.get("CUDA_HOME", "")
    toolkit = [str(Path(home) / "include")] if _has_runtime_header(home) else []
    return toolkit + _nvidia_wheel_includes()


def _nvidia_wheel_includes() -> list[str]:
    """Headers (cusparse.h, ...) that torch's CUDA headers include, from the nvidia-* wheels."""
    dirs = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            dirs += [str(p) for p in sorted(base.glob("*/include")) if p.is_dir()]
            dirs += [str(p) for p in sorted(base.glob("*/*/include")) if p.is_dir()]
    return dirs


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags that make ATen's at::parallel_for (csrc/cpu/multi_tensor.h) run on threads.

    With torch's OpenMP backend, at::parallel_for is an inline `#pragma omp parallel` that a build
    without -fopenmp runs serially. The extension then links torch's own libgomp (torch/lib), so the
    process holds one OpenMP runtime, whose thread count torch.set_num_threads sets. With torch's
    native thread-pool backend the pool lives in libtorch and no flag is needed.
    """
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], []
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return ["-fopenmp"], [str(bundled[0])] if bundled else ["-fopenmp"]


def _extensions() -> tuple[list, dict]:
    use_cuda = _want_cuda()
    if use_cuda:
        os.environ["CUDA_HOME"] = _find_cuda_home() or ""
        import torch

        if not torch.cuda.is_available():  # with a GPU visible, torch builds for that GPU's arch
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # errno-free sqrtf vectorises; no contraction into fused multiply-adds, which would round differently
    # from the reference and between the instruction-set builds of csrc/cpu/kernels_*.cpp; torch adds the
    # C++ standard (C++20)
    omp_compile, omp_link = _openmp_flags()
    cxx_flags = ["-O3", "-fno-math-errno", "-ffp-contract=off", *omp_compile]
    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    include_dirs = [str(ROOT / "csrc")]
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "fastlars._C",
            sources,
            include_dirs=include_dirs + _cuda_include_dirs(),
            define_macros=[("FASTLARS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-fmad=false"]},
            extra_link_args=omp_link,
        )
    else:
        ext = CppExtension("fastlars._C", sources, include_dirs=include_dirs, extra_compile_args=cxx_flags,
                           extra_link_args=omp_link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastlars", "fastlars.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
