#!/usr/bin/env bash
# Session 21, call 7: top selections through candidates in shared memory (select_top).
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
export COMMIT=65d1ddd+
.gpubin/bs/bench_sampling --rows 1,16,64 --iters 50 --out $OUT/sampling.json >> $S 2>&1; echo "rc=$?" >> $S
/tmp/g/pk/pmkv_test_gpu_backend "[sampling]" > $OUT/gpu_sampling.txt 2>&1; echo "gpu sampling rc=$?" >> $S
grep -E "passed|failed|FAILED|logprobs:" $OUT/gpu_sampling.txt | tail -6 >> $S

cat $S
