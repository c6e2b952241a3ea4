#!/usr/bin/env bash
# Session 20, call 5: the GPU backend tests with the extended steps-ahead case (join, leave).
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|differ|FAILED" -A2 $OUT/gpu_backend.txt | tail -12 >> $S
cat $S
