#!/usr/bin/env bash
# The GPU session's build stage. A compiled fastlars._C is used as it is when .ci/gpu_extension_check.py
# proves that it runs on the visible GPU: one already in fastlars/ (an earlier call of the session on
# this machine built it) or one carried in $FASTLARS_PREBUILT (default .gpu-prebuilt/, built on another
# machine against the GPU image's torch, e.g. the CI's min-stack venv with TORCH_CUDA_ARCH_LIST=9.0).
# Otherwise the extension is compiled here from source (pip install -e ., MAX_JOBS from the caller).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
prebuilt=${FASTLARS_PREBUILT:-.gpu-prebuilt}

if ! compgen -G "fastlars/_C*.so" >/dev/null && compgen -G "$prebuilt/_C*.so" >/dev/null; then
  cp "$prebuilt"/_C*.so fastlars/
  echo "gpu_build: trying the carried $(ls "$prebuilt"/_C*.so)"
fi
if compgen -G "fastlars/_C*.so" >/dev/null; then
  if "$PY" .ci/gpu_extension_check.py; then
    echo "gpu_build: using $(ls fastlars/_C*.so), no compile"
    exit 0
  fi
  echo "gpu_build: that extension does not serve this GPU; compiling from source"
  rm -f fastlars/_C*.so
fi
exec "$PY" -m pip install --no-build-isolation --no-deps -e .
