#!/usr/bin/env bash
# The GPU checks of issues 4, 5, 6 and 9 as one command, for a session that is lent a GPU machine
# (the device tool's H100/H200: its own python3 with torch, triton, pytest, ninja and pybind11; no network).
#
#   bash .ci/gpu_session.sh            # from the repository root; logs and results under $OUT (else ./gpu-out)
#
# Stages, each under its own time limit so the whole run ends inside one 10-minute device call:
#   build      pip install --no-build-isolation --no-deps -e .   (CUDA kernels for the visible GPU's arch)
#   tests      every test marked `cuda` (native CUDA and Triton vs the reference, CUDA graphs, torch.compile)
#   sanitizer  compute-sanitizer memcheck and racecheck over tests/cuda_sanitizer_check.py
#   bench      benchmarks/gpu_step.py (BERT-Large and ResNet-50, fp32 and bf16+master, every backend and peer)
# A failed stage is reported and the next one still runs; the exit status is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
failed=0

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
    echo "== $name passed in $((SECONDS - start)) s"
  else
    echo "== $name FAILED (status $?) after $((SECONDS - start)) s; its log ends:"
    tail -40 "$out/$name.log"
    failed=$((failed + 1))
  fi
}

stage build 240 python3 -m pip install --no-build-isolation --no-deps -e .
python3 -c "import fastlars; print(fastlars.env_report())" | tee "$out/env.txt"
stage tests 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/
stage sanitizer 90 bash -c 'for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 1 --target-processes all python3 tests/cuda_sanitizer_check.py || exit 1
  done'
stage bench 150 python3 benchmarks/gpu_step.py --out "$out" --budget 2
tail -30 "$out/tests.log"
exit "$failed"
