#!/usr/bin/env bash
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
G=/tmp/g/pk
timeout 200 $G/pmkv_test_gpu_kernels "[skinny_gemm]" > $W/test_skinny.log 2>&1; echo "gpu skinny rc=$?" >> $W/summary.txt
tail -3 $W/test_skinny.log >> $W/summary.txt
for r in 1 2; do
  for v in old_bench_skinny_gemm bench_skinny_gemm bsg_policy; do
    timeout 60 $G/$v --rows 1,8 > $W/bsg_${v}_r$r.json 2> $W/bsg_${v}_r$r.txt
    echo "$v r$r: $(grep -E 'm=1 bulk |m=8 bulk |m=8 compact |illegal' $W/bsg_${v}_r$r.txt | cut -c1-150 | tr '\n' ' ')" >> $W/summary.txt
  done
done
M="--model bench/configs/llama3-8b --load-format dummy"
for r in 1 2 3; do
  for v in old new; do
    B=$G/bench_cuda_backend; [ $v = old ] && B=$G/old_bench_cuda_backend
    timeout 60 $B $M --scenarios batch1 --decode-steps 200 --async-steps 1 --out $W/b1_${v}_r$r.json > /dev/null 2>> $W/bench.log
    echo "b1 $v r$r $(grep -o '"batch1_decode_ms_per_token":[^,]*' $W/b1_${v}_r$r.json) $(grep -o '"fraction_of_weight_floor":[^,]*' $W/b1_${v}_r$r.json)" >> $W/summary.txt
  done
done
for v in old new; do
  B=$G/bench_cuda_backend; [ $v = old ] && B=$G/old_bench_cuda_backend
  timeout 100 $B $M --scenarios throughput --batches 2,4,8 --contexts 4096 --bits 16,2 --throughput-steps 24 --out $W/tp_${v}.json > /dev/null 2>> $W/bench_tp_$v.log
  grep throughput $W/bench_tp_$v.log | sed "s/^/$v /" >> $W/summary.txt
done
timeout 150 $G/pmkv_test_gpu_backend > $W/test_backend.log 2>&1; echo "gpu_backend rc=$?" >> $W/summary.txt
tail -3 $W/test_backend.log >> $W/summary.txt
cd $OUT && tar czf run5.tgz w && rm -rf w
