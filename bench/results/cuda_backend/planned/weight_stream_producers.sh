#!/usr/bin/env bash
# Planned device call (thirty-third session; not yet run: no device was lent for it). Here:
#   xz -T2 -c build/bench/bench_weight_stream > .gpubin/bws.xz
# then `run` with carry [".gpubin"]: bash bench/results/cuda_backend/planned/weight_stream_producers.sh
# (or all.sh beside it: the three planned calls in one)
# Call 3: does the stream gain with 8 producer warps, or with the ldgsts order?
set -u
xz -dk .gpubin/bws.xz && chmod +x .gpubin/bws
M=tma,producer_ldgsts,producer4_ldgsts,producer8_ldgsts,producer4_sweep,producer8_sweep,ldgsts
for r in 1 2; do
  .gpubin/bws --modes $M --pdl 0,1 > $OUT/ws_r$r.json 2> $OUT/ws_r$r.txt
  cat $OUT/ws_r$r.txt
done
