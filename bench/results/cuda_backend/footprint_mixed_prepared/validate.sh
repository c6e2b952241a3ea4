#!/usr/bin/env bash
# Prepared in the twenty-third session, not run (the session's device time was spent): the
# compact footprint for qkv, o and gate/up at m = 2..8, down on the full one
# (PMKV_COMPACT_GEMM=mixed), against the full footprint everywhere, batch 4 and 8 decode.
# Why: after the tile split (a5a1091), bench_skinny_gemm --rows 8 ran qkv 14.3 / o 10.5 / gate_up
# 58.7 us compact against 15.6 / 11.6 / 60.7 full, and down 33.5 against 30.7
# (tile_split_a5a1091/skinny_r*.json).
# Use: git apply bench/results/cuda_backend/footprint_mixed_prepared/footprint_mixed.patch, build
# bench_cuda_backend, package it (deploy/DEVICE.md) as .gpubin/pk.txz, then run this on the device.
set -u
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh
B=/tmp/g/pk/bench_cuda_backend
M="--model bench/configs/llama3-8b --load-format dummy"
for r in 1 2; do
  for v in 0 mixed; do
    PMKV_COMPACT_GEMM=$v $B $M --scenarios throughput --batches 2,4,8 --contexts 4096 --bits 16,2 \
      --throughput-steps 24 --out "$OUT/tp_${v}_r$r.json" > /dev/null 2>> "$OUT/bench.log"
  done
done
