#!/usr/bin/env bash
# CI: the oldest stack fastlars supports, which is also the GPU machine's (Python 3.12, torch 2.11.0+cu130,
# triton 3.6.0, torchvision 0.26.0), on this CPU machine:
#  1. a venv of that stack in .venv-min (kept between runs, like make setup's .venv);
#  2. a copy of the working tree's tracked files, built there with the CPU kernels, and the whole
#     test suite run against it (the Triton interpreter suite included);
#  3. the CUDA kernels compiled against torch 2.11's headers (.ci/cuda_build_check.sh).
# Takes about 15 minutes on 2 cores, most of it the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/.venv-min
find_python312() {  # $PYTHON312, a pyenv 3.12 (its shim refuses when 3.12 is not the active version), python3.12
  local candidate
  for candidate in "${PYTHON312:-}" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 python3.12; do
    if [[ -n "$candidate" ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "min_stack_check: no Python 3.12 found (set PYTHON312)" >&2
  exit 1
}
PYTHON312=$(find_python312)
start=$(date +%s)

if [[ ! -f "$venv/.deps" ]]; then
  echo "== creating $venv (torch 2.11.0, triton 3.6.0)"
  rm -rf "$venv"
  "$PYTHON312" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q torch==2.11.0 triton==3.6.0 torchvision==0.26.0 ninja pybind11
  touch "$venv/.deps"
fi

work=$(mktemp -d /tmp/fastlars_min_stack.XXXXXX)
trap 'rm -rf "$work"' EXIT
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work"
cd "$work"
echo "== building fastlars (CPU kernels) against $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
FASTLARS_CUDA=0 "$venv/bin/pip" install -q --no-build-isolation -e ".[test,bench,train]"
"$venv/bin/python" -c "import fastlars; print(fastlars.env_report())"
"$venv/bin/python" -m pytest -q -p no:cacheprovider
PYTHON="$venv/bin/python" bash .ci/cuda_build_check.sh
echo "min_stack_check finished in $(( $(date +%s) - start )) s"
