#!/usr/bin/env bash
# The GPU checks of issues 4, 5, 6 and 9 as one command, for a session that is lent a GPU machine
# (the device tool's H100/H200: its own python3 with torch 2.11, triton 3.6, pytest, ninja and pybind11;
# no network). The same stack can be rebuilt on a CPU machine to catch API breaks first: Python 3.12,
# torch==2.11.0 triton==3.6.0 from PyPI, then `pytest tests/` (no GPU needed).
#
#   bash .ci/gpu_session.sh            # from the repository root; results under $OUT (else ./gpu-out)
#
# Stages, each under its own time limit so the whole run ends inside one 10-minute device call:
#   build          pip install --no-build-isolation --no-deps -e .   (CUDA kernels for the visible GPU's arch)
#   tests          every test marked `cuda` (native CUDA and Triton vs the reference, CUDA graphs, compile)
#   memcheck, racecheck  compute-sanitizer over tests/cuda_sanitizer_check.py
#   bench          benchmarks/gpu_step.py: BERT-Large and ResNet-50, fp32 and bf16+master, every backend,
#                  every peer but the compiled reference (its compile alone would take the stage's time)
#   bench_compile  native vs the reference under torch.compile, ResNet-50 fp32, in $OUT/compile
# Every stage's log goes into $OUT/session.log (the device tool brings back at most 8 files: this
# log, and JSON, Markdown and PNG of each benchmark). A failed stage is reported and the next one still
# runs; the exit status is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
log="$out/session.log"
: >"$log"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
failed=0

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 status
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  local offset
  offset=$(stat -c %s "$log")
  timeout "$limit" "$@" >>"$log" 2>&1
  status=$?
  if ((status == 0)); then
    echo "== $name passed in $((SECONDS - start)) s" | tee -a "$log"
  else
    echo "== $name FAILED (status $status) after $((SECONDS - start)) s; its log ends:"
    tail -c +"$((offset + 1))" "$log" | tail -n 40
    echo "== $name FAILED (status $status)" >>"$log"
    failed=$((failed + 1))
  fi
}

stage build 140 python3 -m pip install --no-build-isolation --no-deps -e .
python3 -c "import fastlars; print(fastlars.env_report())" 2>&1 | tee -a "$log"
stage tests 200 python3 -m pytest -v -m cuda -p no:cacheprovider --durations=25 tests/
grep -E "^(FAILED|ERROR)|passed|failed" "$log" | tail -15
# memcheck and racecheck as separate stages, so a slow racecheck cannot cost memcheck its verdict
sanitize=(--error-exitcode 1 --target-processes all python3 tests/cuda_sanitizer_check.py)
stage memcheck 50 compute-sanitizer --tool memcheck "${sanitize[@]}"
stage racecheck 40 compute-sanitizer --tool racecheck "${sanitize[@]}"
stage bench 100 python3 benchmarks/gpu_step.py --out "$out" --budget 2 --peers timm,torch_optimizer,torch_fused,apex,deepspeed
stage bench_compile 60 python3 benchmarks/gpu_step.py --out "$out/compile" --budget 2 --params resnet50 --dtype fp32 \
  --backends native --peers reference+compile
exit "$failed"
