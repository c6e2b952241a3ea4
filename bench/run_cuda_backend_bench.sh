#!/usr/bin/env bash
# The CUDA backend benchmarks on the device machine (deploy/DEVICE.md: bundle, carry, source
# env.sh first): bench_cuda_backend on the Llama-3-8B shape with dummy weights (cuBLASLt and our
# skinny GEMM side by side in the "gemm" scenario; batch-1 decode vs the weight-read floor;
# 4K prefill and TTFT; decode throughput at batch 16/64/128, contexts 4K/16K, 16-bit and
# progressive 4-/2-bit caches), then the transformers reference (bench/hf_reference.py) on the
# same shape. Usage (repository root):
#   COMMIT=$(git rev-parse HEAD) bench/run_cuda_backend_bench.sh OUT_DIR
# Writes OUT_DIR/cuda_backend_llama3-8b.json, OUT_DIR/hf_reference_llama3-8b.json and the logs.
set -euo pipefail
OUT_DIR=${1:?usage: run_cuda_backend_bench.sh OUT_DIR}
mkdir -p "$OUT_DIR"
export COMMIT=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
MODEL=bench/configs/llama3-8b
CMD="bench_cuda_backend --model $MODEL --load-format dummy --scenarios gemm,batch1,prefill,throughput \
--decode-steps 128 --batches ${BATCHES:-16,64,128} --contexts ${CONTEXTS:-4096,16384} --bits 16,4,2 \
--throughput-steps ${TP_STEPS:-24}"
echo "+ $CMD" >&2
$CMD --out "$OUT_DIR/cuda_backend_llama3-8b.json" 2>&1 | grep -v '\[info\]' | tee "$OUT_DIR/cuda_backend.log"
PMKV_GEMM=cublaslt bench_cuda_backend --model $MODEL --load-format dummy --scenarios gemm,batch1 \
  --decode-steps 128 --out "$OUT_DIR/cuda_backend_llama3-8b_cublaslt.json" 2>&1 |
  grep -v '\[info\]' | tee "$OUT_DIR/cuda_backend_cublaslt.log"
HF="python3 bench/hf_reference.py --config $MODEL/config.json"
echo "+ $HF" >&2
$HF --out "$OUT_DIR/hf_reference_llama3-8b.json" > "$OUT_DIR/hf_reference.log" 2>&1 || tail -20 "$OUT_DIR/hf_reference.log"
