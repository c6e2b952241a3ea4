#!/usr/bin/env bash
# Session 21, call 12: top-k survivors filtered and drawn among the candidates (sorted by id).
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
export COMMIT=candidates-draw
/tmp/g/pk/pmkv_test_gpu_backend "[sampling]" > $OUT/gpu_sampling.txt 2>&1; echo "gpu sampling rc=$?" >> $S
grep -E "passed|failed|FAILED|logprobs:" $OUT/gpu_sampling.txt | tail -6 >> $S
.gpubin/bs/bench_sampling --rows 1,64 --iters 50 --out $OUT/sampling.json >> $S 2>&1; echo "rc=$?" >> $S
cat $S
