#!/usr/bin/env bash
# Planned device call (thirty-third session; not yet run: no device was lent after its first two
# calls): the small kernels and the KV byte kernels against their floors. Here:
#   xz -T2 -c build/bench/bench_layer_ops > .gpubin/blo.xz
# then `run` with carry [".gpubin"]: bash bench/results/cuda_backend/planned/layer_ops.sh
set -u
xz -dk .gpubin/blo.xz && chmod +x .gpubin/blo
for r in 1 2; do
  COMMIT=${COMMIT:-unknown} .gpubin/blo --out $OUT/layer_ops_r$r.jsonl \
    2> $OUT/layer_ops_r$r.txt
  cat $OUT/layer_ops_r$r.txt
done
