#!/usr/bin/env bash
# Session 21, call 14: top-p over the row stops after its first digit when the nucleus region
# fits in shared memory. GPU sampling tests, then a same-call A/B (old = de8e613's kernel) at
# sigma 3 (a flat nucleus of thousands: falls back) and sigma 6 (peaked).
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
/tmp/g/pk/pmkv_test_gpu_backend "[sampling]" > $OUT/gpu_sampling.txt 2>&1; echo "gpu sampling rc=$?" >> $S
grep -E "passed|failed|FAILED|logprobs:" $OUT/gpu_sampling.txt | tail -6 >> $S
for sg in 3 6; do for r in 1 2; do for v in old new; do
  echo "== $v sigma $sg round $r" >> $S
  .gpubin/bs/bench_sampling_$v --rows 1,64 --iters 50 --sigma $sg --modes greedy,t0.8,topk50,topp09,t0.7+topp095,topk50+topp095,minp005 --out $OUT/ab_${v}_s${sg}_$r.json >> $S 2>&1
done; done; done
cat $S
