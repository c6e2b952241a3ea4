#!/usr/bin/env bash
# Device call: CTA timelines (PMKV_DECODE_TRACE build of d5f0897) of the 2-bit points short of 5x.
# Built here: cmake -S . -B /tmp/build-trace -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90
#   -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_FLAGS=-DPMKV_DECODE_TRACE -DPMKV_BUILD_TESTS=OFF
#   && ninja -C /tmp/build-trace bench_decode_attention; xz'd into .gpubin/ (carry [".gpubin"]).
set -u
xz -dk .gpubin/bda_trace.xz && chmod +x .gpubin/bda_trace
mkdir -p $OUT/tr
PMKV_TRACE_DIR=$OUT/tr .gpubin/bda_trace --bits 2 --batch 16,64 --ctx 4096,16384 --min-time-ms 100 \
  --out $OUT/points.jsonl > /dev/null
python3 bench/decode_trace_report.py $OUT/tr/*.txt | tee $OUT/report.txt
