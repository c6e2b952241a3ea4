#!/usr/bin/env bash
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
G=/tmp/g/pk
timeout 200 $G/pmkv_test_gpu_backend "[sampling]" > $W/test_sampling.log 2>&1; echo "gpu sampling rc=$?" >> $W/summary.txt
tail -3 $W/test_sampling.log >> $W/summary.txt; grep "sampling slices" $W/test_sampling.log >> $W/summary.txt
MODES=greedy,t1,t0.8,minp,penalties,topk50,topp09
for r in 1 2; do
  $G/old_bench_sampling --rows 1,2,4,8,16 --iters 50 --modes $MODES --out $W/bs_old_r$r.json > $W/bs_old_r$r.txt 2>&1
  $G/bench_sampling --rows 1,2,4,8,16 --iters 50 --modes $MODES --out $W/bs_new_r$r.json > $W/bs_new_r$r.txt 2>&1
done
M="--model bench/configs/llama3-8b --load-format dummy"
for r in 1 2; do
  for v in old new0 new; do
    B=$G/bench_cuda_backend; [ $v = old ] && B=$G/old_bench_cuda_backend
    S=1; [ $v = new0 ] && S=0
    PMKV_SAMPLING_SLICES=$S timeout 60 $B $M --scenarios batch1 --decode-steps 200 --async-steps 1 --out $W/b1_${v}_r$r.json > /dev/null 2>> $W/bench.log
    echo "b1 greedy $v r$r $(grep -o '"batch1_decode_ms_per_token":[^,]*' $W/b1_${v}_r$r.json)" >> $W/summary.txt
    PMKV_SAMPLING_SLICES=$S timeout 60 $B $M --scenarios batch1 --decode-steps 200 --async-steps 1 --temperature 1 --out $W/b1t_${v}_r$r.json > /dev/null 2>> $W/bench.log
    echo "b1 t1 $v r$r $(grep -o '"batch1_decode_ms_per_token":[^,]*' $W/b1t_${v}_r$r.json)" >> $W/summary.txt
  done
done
KTRACE_MEMCPY=1 CUDA_INJECTION64_PATH=$G/libktrace.so KTRACE_OUT=$W/kt_t1.csv timeout 60 $G/bench_cuda_backend $M --scenarios batch1 --decode-steps 40 --async-steps 1 --temperature 1 > /dev/null 2>> $W/bench_kt.log
python3 tools/ktrace/step.py $W/kt_t1.csv 5 35 6 6 > $W/kt_t1_step.txt 2>&1
gzip $W/kt_t1.csv
timeout 150 $G/pmkv_test_gpu_backend > $W/test_backend.log 2>&1; echo "gpu_backend rc=$?" >> $W/summary.txt
tail -3 $W/test_backend.log >> $W/summary.txt
cd $OUT && tar czf run8.tgz w && rm -rf w
