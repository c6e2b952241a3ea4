#!/usr/bin/env bash
# Session 21, call 4: the sampling kernel per mode (bench_sampling).
S=$OUT/summary.txt; : > $S
export COMMIT=65d1ddd+
.gpubin/bs/bench_sampling --rows 1,16,64 --iters 50 --out $OUT/sampling.json >> $S 2>&1; echo "rc=$?" >> $S
which ncu >> $S 2>&1
cat $S
