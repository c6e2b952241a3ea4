#!/usr/bin/env bash
# ctest gpu_serve: `pmkv serve --device cuda` end to end; exits 77 (skipped) without a GPU.
#  1. test_serve_cuda.py: raw-HTTP checks of the CUDA server (device sampling, logprobs, ...).
#  2. The server's integration suite (tests/integration/test_serve_{http,grpc,load}.py, the openai
#     SDK, grpcio and httpx) against a CUDA server of the reference model (models/pmkv-ref; its
#     random-weight twin when model.safetensors is not there, as on the device machine where the
#     weights cannot travel with the binaries). Its stories260K-only expectations are skipped
#     (conftest.py).
set -euo pipefail
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no GPU: skipped"
  exit 77
fi
PY=${PMKV_PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${PMKV_SOURCE_DIR:-$(cd "$HERE/../../.." && pwd)}
"$PY" -m pytest -q -p no:cacheprovider "$HERE/test_serve_cuda.py" "$@"
ARGS="--set engine.device=cuda"
if [ ! -f "$SRC/models/pmkv-ref/model.safetensors" ]; then
  ARGS="$ARGS --set model.load_format=dummy"
fi
PMKV_TEST_MODEL="$SRC/models/pmkv-ref" PMKV_TEST_SERVE_ARGS="$ARGS" \
  "$PY" -m pytest -q -p no:cacheprovider -rs "$SRC/tests/integration/test_serve_http.py" \
  "$SRC/tests/integration/test_serve_grpc.py" "$SRC/tests/integration/test_serve_load.py" "$@"
