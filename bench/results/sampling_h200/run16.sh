#!/usr/bin/env bash
# Session 21, call 3: warp-aggregated counting in the sampling kernel's radix selection (top-k,
# top log-probabilities); the sampling tests, then the decode step's cost per sampling mode.
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
T0=$(date +%s)
/tmp/g/pk/pmkv_test_gpu_backend "[sampling]" > $OUT/gpu_sampling.txt 2>&1; echo "gpu sampling rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|FAILED|logprobs:" $OUT/gpu_sampling.txt | tail -6 >> $S
/tmp/g/pk/pmkv_test_gpu_backend "cuda backend: log-probabilities*" > $OUT/gpu_backend_lp.txt 2>&1; echo "gpu backend logprobs rc=$? ($(( $(date +%s) - T0 )) s)" >> $S
grep -E "passed|failed|FAILED" $OUT/gpu_backend_lp.txt | tail -3 >> $S
export COMMIT=65d1ddd+
i=0
while read -r name args; do
  i=$((i+1))
  /tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy --scenarios throughput \
    --batches 1,16,64 --contexts 4096 --bits 16 --throughput-steps 24 --async-steps 1 $args --out $OUT/tp_$name.json > $OUT/tp_$name.txt 2>&1
  echo "$name [$args] rc=$? ($(( $(date +%s) - T0 )) s): $(python3 -c "
import json
j=json.load(open('$OUT/tp_$name.json'))
print([(p['batch'],round(p['step_ms_median'],3),round(p['tokens_per_s'],1)) for p in j['throughput']])" 2>&1)" >> $S
done <<'LIST'
greedy --logprobs -1
greedy_lp0 --logprobs 0
greedy_lp5 --logprobs 5
greedy_lp20 --logprobs 20
t1 --temperature 1
t1_topk50 --temperature 1 --top-k 50
t1_topp09 --temperature 1 --top-p 0.9
t08_k50_p095_lp5 --temperature 0.8 --top-k 50 --top-p 0.95 --logprobs 5
greedy_b --logprobs -1
greedy_lp20_b --logprobs 20
LIST
cd $OUT && tar -cJf logs.txz gpu_sampling.txt gpu_backend_lp.txt tp_*.txt && rm -f gpu_sampling.txt gpu_backend_lp.txt tp_*.txt && tar -cJf tp_json.txz tp_*.json && rm -f tp_*.json
cat $S
