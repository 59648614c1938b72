#!/usr/bin/env bash
# The GPU session's build stage. A compiled fastlars._C is used as it is when it was built from the tree's
# sources (.ci/source_fingerprint.py: setup.py and csrc/) and .ci/gpu_extension_check.py proves that it runs
# on the visible GPU: one already in fastlars/ that an earlier call built (stamped in fastlars/.gpu_build_sources)
# or one carried in $FASTLARS_PREBUILT (default .gpu-prebuilt/, built on another machine against the GPU
# image's torch, e.g. the CI's min-stack venv with TORCH_CUDA_ARCH_LIST=9.0, with its fingerprint in
# SOURCES beside it: python3 .ci/source_fingerprint.py > .gpu-prebuilt/SOURCES). Otherwise, and whenever the
# sources changed since, the extension is compiled here from source (pip install -e ., MAX_JOBS from the caller).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
prebuilt=${FASTLARS_PREBUILT:-.gpu-prebuilt}
stamp=fastlars/.gpu_build_sources
sources=$("$PY" .ci/source_fingerprint.py) || exit 1

if compgen -G "fastlars/_C*.so" >/dev/null && [[ "$(cat "$stamp" 2>/dev/null)" != "$sources" ]]; then
  echo "gpu_build: $(ls fastlars/_C*.so) was not built from these sources; compiling from source"
  rm -f fastlars/_C*.so "$stamp"
fi
if ! compgen -G "fastlars/_C*.so" >/dev/null && compgen -G "$prebuilt/_C*.so" >/dev/null; then
  if [[ "$(cat "$prebuilt/SOURCES" 2>/dev/null)" == "$sources" ]]; then
    cp "$prebuilt"/_C*.so fastlars/
    echo "$sources" >"$stamp"
    echo "gpu_build: trying the carried $(ls "$prebuilt"/_C*.so)"
  else
    echo "gpu_build: the carried $(ls "$prebuilt"/_C*.so) was built from other sources ($prebuilt/SOURCES); not used"
  fi
fi
if compgen -G "fastlars/_C*.so" >/dev/null; then
  if "$PY" .ci/gpu_extension_check.py; then
    echo "gpu_build: using $(ls fastlars/_C*.so), no compile"
    exit 0
  fi
  echo "gpu_build: that extension does not serve this GPU; compiling from source"
  rm -f fastlars/_C*.so "$stamp"
fi
"$PY" -m pip install --no-build-isolation --no-deps -e . || exit
echo "$sources" >"$stamp"
