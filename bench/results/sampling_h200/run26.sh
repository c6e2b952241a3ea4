#!/usr/bin/env bash
# Session 21, call 13: same-call A/B of the sampling kernel, 98d02b4's (old) against the
# candidates' filter and draw (new), both built alike (nvcc -O3 -arch=sm_90), two rounds.
S=$OUT/summary.txt; : > $S
for r in 1 2; do for v in old new; do
  echo "== $v round $r" >> $S
  .gpubin/bs/bench_sampling_$v --rows 1,64 --iters 50 --modes greedy,topk50,topk50+lp5,topp09,topk50+topp095,t0.8 --out $OUT/ab_${v}_$r.json >> $S 2>&1
done; done
cat $S
