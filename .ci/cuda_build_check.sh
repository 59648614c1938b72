#!/usr/bin/env bash
# CI (no GPU needed): the CUDA kernels compile, link and register.
#  1. builds and runs the host test of the chunk planner (csrc/cuda/chunk_plan.h);
#  2. builds fastlars._C with the CUDA sources (FASTLARS_CUDA=1) into a temporary directory, so the
#     in-place CPU build of the working tree is left alone;
#  3. imports that build in a fresh interpreter as fastlars._C and fails unless kernel_devices()
#     lists "cuda" and every fastlars op has a kernel for the CUDA dispatch key.
# Took 266 s and 414 s on 2 cores (sm_80 + sm_90, other jobs running) once lowbit.cu joined the kernels. Set KEEP_CUDA_BUILD=1 to keep the build dir.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CXX_BIN=${CXX:-c++}

work=$(mktemp -d /tmp/fastlars_cuda_check.XXXXXX)
if [[ "${KEEP_CUDA_BUILD:-0}" != 1 ]]; then trap 'rm -rf "$work"' EXIT; fi
start=$(date +%s)

echo "== chunk planner host test"
"$CXX_BIN" -std=c++17 -O1 -Wall -Wextra -Werror -I csrc/cuda csrc/cuda/test/chunk_plan_test.cpp -o "$work/chunk_plan_test"
"$work/chunk_plan_test"

echo "== building fastlars._C with CUDA kernels into $work"
FASTLARS_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} \
  "$PY" setup.py -q build_ext --build-temp "$work/tmp" --build-lib "$work/lib" > "$work/build.log" 2>&1 || {
  tail -n 60 "$work/build.log"
  echo "cuda_build_check: the CUDA build failed (log above)" >&2
  exit 1
}
so=$(find "$work/lib" -name '_C*.so' | head -n 1)
[[ -n "$so" ]] || { echo "cuda_build_check: no _C*.so was produced" >&2; exit 1; }

echo "== importing $so"
"$PY" - "$so" <<'EOF'
import importlib.util
import sys

import torch

so = sys.argv[1]
# Load the CUDA build as fastlars._C before the package can import its in-place (CPU) build.
spec = importlib.util.spec_from_file_location("fastlars._C", so)
module = importlib.util.module_from_spec(spec)
sys.modules["fastlars._C"] = module
spec.loader.exec_module(module)

import fastlars  # noqa: E402

try:
    import fastlars._ops  # noqa: F401  (defines the op schemas; a kernel that does not match them raises here)

    has_schemas = True
except ModuleNotFoundError as exc:
    if exc.name != "fastlars._ops":
        raise
    has_schemas = False
if sys.modules["fastlars._C"] is not module:
    sys.exit("cuda_build_check: the package imported another fastlars._C than the CUDA build")

problems = []
devices = list(module.kernel_devices())
if "cuda" not in devices:
    problems.append(f"kernel_devices() is {devices}, without 'cuda'")
if not module.built_with_cuda():
    problems.append("built_with_cuda() is False")
for op in ("grad_norms", "lars_step_", "lamb_step_", "lamb_lowbit_step_", "lars_lowbit_step_"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlars::{op}", "CUDA"):
        problems.append(f"fastlars::{op} has no CUDA kernel")
    elif has_schemas and not hasattr(torch.ops.fastlars, op):
        problems.append(f"fastlars::{op} has a CUDA kernel but fastlars._ops defines no schema for it")
if problems:
    sys.exit("cuda_build_check: " + "; ".join(problems))
print(f"CUDA build OK: kernels for {devices}; torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
echo "cuda_build_check finished in $(( $(date +%s) - start )) s"
