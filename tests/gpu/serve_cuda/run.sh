#!/usr/bin/env bash
# ctest gpu_serve: `pmkv serve --device cuda` end to end; exits 77 (skipped) without a GPU.
set -euo pipefail
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no GPU: skipped"
  exit 77
fi
PY=${PMKV_PYTHON:-python3}
exec "$PY" -m pytest -q -p no:cacheprovider "$(dirname "$0")/test_serve_cuda.py" "$@"
