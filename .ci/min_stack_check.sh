#!/usr/bin/env bash
# CI: the oldest stack fastlars supports, which is also the GPU machine's (Python 3.12, torch 2.11.0+cu130,
# triton 3.6.0, torchvision 0.26.0), on this CPU machine:
#  1. a venv of that stack in .venv-min (kept between runs, like make setup's .venv; rebuilt when its
#     package list changes): the pinned torch/triton/torchvision, ninja, pybind11 and the test, bench
#     and train extras of pyproject.toml EXCEPT torch-optimizer and the low-precision peers (bitsandbytes,
#     torchao, torch-optimi), which the GPU image lacks (it has timm,
#     pytest, pytest-timeout, tensorboard and build; the device tool's KINDS.md lists it);
#  2. a copy of the working tree's tracked files, built there with the CPU kernels;
#  3. the GPU session's collection: `pytest -m cuda --collect-only` must collect the GPU suite with no
#     error on that package set (one module-level import of a missing peer would make the GPU machine
#     run no test at all); the count is printed;
#  4. the whole test suite run against it (the Triton interpreter suite included; the torch-optimizer
#     comparisons skip here with their reason and run in the main CI venv);
#  5. the CUDA kernels compiled against torch 2.11's headers (.ci/cuda_build_check.sh).
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

# Not on the GPU image, so never installed here: step 3 then collects on the image's package set.
not_on_gpu_image=(torch-optimizer bitsandbytes torchao torch-optimi)
mapfile -t deps < <("$PYTHON312" - "${not_on_gpu_image[@]}" <<'PY'
import re
import sys
import tomllib

extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
excluded = set(sys.argv[1:])
deps = ["torch==2.11.0", "triton==3.6.0", "torchvision==0.26.0", "ninja", "pybind11", "setuptools", "wheel"]
seen = {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() for dep in deps}
for extra in ("test", "bench", "train"):
    for dep in extras[extra]:
        name = re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower()
        if name not in excluded and name not in seen:
            seen.add(name)
            deps.append(dep)
print("\n".join(deps))
PY
)
if [[ "$(cat "$venv/.deps" 2>/dev/null)" != "${deps[*]}" ]]; then
  echo "== creating $venv: ${deps[*]}"
  rm -rf "$venv"
  "$PYTHON312" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "${deps[@]}"
  echo "${deps[*]}" >"$venv/.deps"
fi
for name in "${not_on_gpu_image[@]}"; do  # a venv made by an earlier version of this script may hold it
  if "$venv/bin/pip" show -q "$name" >/dev/null 2>&1; then "$venv/bin/pip" uninstall -q -y "$name"; fi
done

work=$(mktemp -d /tmp/fastlars_min_stack.XXXXXX)
trap 'rm -rf "$work"' EXIT
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work"
cd "$work"
echo "== building fastlars (CPU kernels) against $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
FASTLARS_CUDA=0 "$venv/bin/pip" install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -c "import fastlars; print(fastlars.env_report())"

echo "== collecting the GPU session's suite (pytest -m cuda --collect-only) without ${not_on_gpu_image[*]}"
collect_log=$work/collect.log
if ! "$venv/bin/python" -m pytest -m cuda --collect-only -q -p no:cacheprovider >"$collect_log" 2>&1 \
    || grep -qE "^ERROR|[0-9]+ errors? in" "$collect_log"; then
  cat "$collect_log"
  echo "min_stack_check: the cuda suite does not collect cleanly on the GPU image's package set" >&2
  exit 1
fi
echo "cuda suite on the GPU image's package set: $(tail -n 1 "$collect_log" | grep -oE '^[0-9]+') tests collected," \
  "0 errors (pytest: $(tail -n 1 "$collect_log"))"

"$venv/bin/python" -m pytest -q -p no:cacheprovider
PYTHON="$venv/bin/python" bash .ci/cuda_build_check.sh
echo "min_stack_check finished in $(( $(date +%s) - start )) s"
