#!/usr/bin/env bash
# Configures and builds pmkv into build/ (Release, Ninja, ccache). CUDA is built when nvcc is found
# (PATH or /usr/local/cuda); pass -DPMKV_CUDA=OFF (or any cmake -D option) as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
BUILD_DIR=${PMKV_BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
ninja -C "$BUILD_DIR"
