#!/usr/bin/env bash
# Builds, here, everything scripts/device_suite.sh runs on the device machine, and packs it into
# the two carried folders (deploy/DEVICE.md):
#   .gpubin/pk.txz  pmkv, the GPU test binaries and bench_cuda_backend with their libraries
#                   (scripts/package_device.sh), built for sm_90 in build/ ($PMKV_BUILD_DIR);
#   .whl/           the serving suite's pinned wheels for the device's python 3.12 (kept when
#                   already there: pip cannot download from the device, only here).
# Then `run` with carry [".gpubin", ".whl"] and models/pmkv-ref/model.safetensors moved out of the
# tree (the 64 MiB limit): `bash scripts/device_suite.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/cuda/bin:$PATH
BUILD=${PMKV_BUILD_DIR:-build}
TARGETS=(pmkv pmkv_test_gpu_kernels pmkv_test_gpu_backend bench_cuda_backend)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
ninja -C "$BUILD" "${TARGETS[@]}"
bins=()
for t in "${TARGETS[@]}"; do
  f=$(find "$BUILD" -type f -name "$t" -perm -u+x | head -1)
  [ -n "$f" ] || { echo "error: $t not built" >&2; exit 1; }
  bins+=("$f")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts/package_device.sh "$tmp/pk" "${bins[@]}" >/dev/null
# The commit the binaries were built from ("+" when the tree had changes), for the suite's summary.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!models' || echo +)" > "$tmp/pk/COMMIT"
mkdir -p .gpubin
tar -C "$tmp" -cJf .gpubin/pk.txz pk
if [ ! -f .whl/requirements.txt ]; then
  pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$tmp/whl" -r scripts/requirements.txt
  mkdir -p .whl
  cp $(ls -d "$tmp"/whl/* | grep -v numpy) .whl/
  grep -v numpy scripts/requirements.txt > .whl/requirements.txt
fi
du -sh .gpubin/pk.txz .whl
