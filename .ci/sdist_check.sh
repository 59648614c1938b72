#!/usr/bin/env bash
# CI: the source distribution is complete and builds fastlars._C from scratch, as a user installs it.
#  1. `python -m build --sdist` of the tracked files (no isolation: torch and setuptools are those of
#     $PYTHON's environment, as the README's `pip install --no-build-isolation` asks);
#  2. a clean venv without fastlars, which sees torch and the build tools of $PYTHON's environment
#     through one .pth line (nothing copied), installs the sdist with --no-build-isolation: the C++ CPU
#     kernels compile from the sdist's sources alone (FASTLARS_CUDA=0 keeps it short; the CUDA kernels
#     have .ci/cuda_build_check.sh);
#  3. that install imports from the venv's site-packages and passes `python -m fastlars` (every backend
#     against the reference);
#  4. no deprecation warning in the output of either build (setuptools' license-table deprecation was one).
# Takes about 2 minutes on 2 cores, most of it the compile.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
start=$(date +%s)
work=$(mktemp -d /tmp/fastlars_sdist.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work/src"

no_deprecations() {  # $1: a build log; fails on any Python deprecation warning in it
  if grep -n -i -E "deprecat" "$1"; then
    echo "sdist_check: deprecation warning in $(basename "$1") (above)" >&2
    exit 1
  fi
}

echo "== python -m build --sdist"
FASTLARS_CUDA=0 "$PYTHON" -m build --sdist --no-isolation --outdir "$work/dist" "$work/src" > "$work/sdist.log" 2>&1 \
  || { tail -40 "$work/sdist.log"; exit 1; }
no_deprecations "$work/sdist.log"
sdist=$(ls "$work"/dist/fastlars-*.tar.gz)
tar -tzf "$sdist" > "$work/members.txt"
for member in csrc/cpu/kernels.inc csrc/common/step_math.h csrc/cuda/ops.cpp csrc/cuda/lamb.cu LICENSE; do
  grep -q "/$member\$" "$work/members.txt" || { echo "sdist_check: $member is missing from $(basename "$sdist")" >&2; exit 1; }
done
echo "$(basename "$sdist"): $(wc -l < "$work/members.txt") files"

echo "== clean venv, pip install --no-build-isolation $(basename "$sdist")"
"$PYTHON" -m venv --without-pip "$work/venv"
outer=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
inner=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$outer" > "$inner/outer-environment.pth"
cd "$work"  # away from any source tree, so `import fastlars` can only find the installed copy
build_start=$(date +%s)
FASTLARS_CUDA=0 "$work/venv/bin/python" -m pip install -v --no-build-isolation --no-deps --ignore-installed \
  --no-cache-dir "$sdist" > "$work/install.log" 2>&1 || { tail -60 "$work/install.log"; exit 1; }
no_deprecations "$work/install.log"
echo "built and installed in $(( $(date +%s) - build_start )) s"
"$work/venv/bin/python" -c "import fastlars, sys; assert fastlars.__file__.startswith('$inner'), fastlars.__file__"
OMP_NUM_THREADS=1 "$work/venv/bin/python" -W error::DeprecationWarning -m fastlars
echo "sdist_check finished in $(( $(date +%s) - start )) s"
