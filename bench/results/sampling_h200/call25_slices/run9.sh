#!/usr/bin/env bash
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
G=/tmp/g/pk
M="--model bench/configs/llama3-8b --load-format dummy"
for v in 0 1; do
  PMKV_SAMPLING_SLICES=$v KTRACE_MEMCPY=1 CUDA_INJECTION64_PATH=$G/libktrace.so KTRACE_OUT=$W/kt_t1_s$v.csv timeout 60 $G/bench_cuda_backend $M --scenarios batch1 --decode-steps 40 --async-steps 1 --temperature 1 > /dev/null 2>> $W/bench_kt.log
  echo "== slices=$v" >> $W/summary.txt
  python3 tools/ktrace/step.py $W/kt_t1_s$v.csv 5 35 4 8 >> $W/summary.txt 2>&1
done
for r in 1 2 3; do
  for v in 0 1; do
    PMKV_SAMPLING_SLICES=$v timeout 60 $G/bench_cuda_backend $M --scenarios batch1 --decode-steps 300 --async-steps 1 --temperature 1 --out $W/b1t_s${v}_r$r.json > /dev/null 2>> $W/bench.log
    echo "b1 t1 slices=$v r$r $(grep -o '"batch1_decode_ms_per_token":[^,]*' $W/b1t_s${v}_r$r.json)" >> $W/summary.txt
  done
done
gzip $W/*.csv
cd $OUT && tar czf run9.tgz w && rm -rf w
