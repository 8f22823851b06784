#!/usr/bin/env bash
# Everything a fresh machine needs to build, test and run speciesclf. Safe to run again: it installs only
# what is missing and rebuilds incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."

# System codecs for the native core (Debian package names). Without them the build still works and
# Pillow decodes what is missing.
packages=(pkg-config libjpeg62-turbo-dev libspng-dev libwebp-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages (install them as root): ${missing[*]}" >&2
  fi
fi

PY=${PYTHON:-python3}
# torch==2.13.0 is the CPU wheel on this machine's disk; an open range would pull a multi-GB CUDA build.
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check scikit-build-core pybind11 cmake ninja
# With a CUDA compiler on the PATH the GPU module is built too (even with no GPU here, so that CUDA code
# that does not compile fails the build). nvJPEG's header and library come from NVIDIA's wheel for the
# toolkit's major version (a few MB).
if command -v nvcc >/dev/null; then
  cuda_major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  "$PY" -m pip install -q --disable-pip-version-check "nvidia-nvjpeg>=${cuda_major}.0,<$((cuda_major + 1))"
fi
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation ".[test,onnx,serve]"
