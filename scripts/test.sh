#!/usr/bin/env bash
# Builds pmkv and runs every test: Catch2 unit tests, the golden tests against Hugging Face
# transformers' recorded logits, the fuzz corpus replay and the integration tests that drive the
# real binary. GPU tests (ctest label `gpu`) skip themselves when no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh "$@"
export PATH="$PWD/.venv/bin:$PATH"
ctest --test-dir "${PMKV_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)"
