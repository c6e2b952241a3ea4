#!/usr/bin/env bash
# Session 18, call 3: batch-1 ablations (timing only: skipped kernels make wrong tokens) + ktrace.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
tar -C /tmp -xJf .gpubin/kt.txz
B="/tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy --scenarios batch1 --decode-steps 200"
: > $OUT/summary.txt
for r in 1 2; do
  for ab in none rope attn rope,attn ogemm attn,ogemm rope,attn,ogemm; do
    line=$(PMKV_ABLATE=$ab $B 2>&1 | grep "batch1 decode")
    echo "r$r ablate=$ab: $line" >> $OUT/summary.txt
  done
done
CUDA_INJECTION64_PATH=/tmp/kt/libktrace.so KTRACE_OUT=$OUT/kt_base.csv $B > /dev/null 2>&1
python3 tools/ktrace/layers.py $OUT/kt_base.csv > $OUT/kt_base_layers.txt 2>&1
xz -T4 $OUT/kt_base.csv
cat $OUT/kt_base_layers.txt | tail -40
sort -k2,2 $OUT/summary.txt
