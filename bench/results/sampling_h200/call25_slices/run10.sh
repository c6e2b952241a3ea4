#!/usr/bin/env bash
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
G=/tmp/g/pk
M="--model bench/configs/llama3-8b --load-format dummy"
for r in 1 2 3; do
  for v in s0 s1p1 s1p0; do
    S=1; P=1; [ $v = s0 ] && S=0; [ $v = s1p0 ] && P=0
    PMKV_SAMPLING_SLICES=$S PMKV_SAMPLING_PDL=$P timeout 60 $G/bench_cuda_backend $M --scenarios batch1 --decode-steps 300 --async-steps 1 --temperature 1 --out $W/b1t_${v}_r$r.json > /dev/null 2>> $W/bench.log
    echo "b1 t1 $v r$r $(grep -o '"batch1_decode_ms_per_token":[^,]*' $W/b1t_${v}_r$r.json)" >> $W/summary.txt
  done
done
for v in s0 s1p1; do
  S=1; [ $v = s0 ] && S=0
  PMKV_SAMPLING_SLICES=$S timeout 60 $G/bench_cuda_backend $M --scenarios batch1 --decode-steps 300 --async-steps 0 --temperature 1 --out $W/b1t_sync_${v}.json > /dev/null 2>> $W/bench.log
  echo "b1 t1 sync $v $(grep -o '"batch1_decode_ms_per_token":[^,]*' $W/b1t_sync_${v}.json) $(grep -o '"batch1_forward_ms":[^,]*' $W/b1t_sync_${v}.json)" >> $W/summary.txt
  PMKV_SAMPLING_SLICES=$S timeout 60 $G/bench_cuda_backend $M --scenarios throughput --batches 4,8 --contexts 4096 --bits 16 --throughput-steps 24 --temperature 1 --out $W/tp_${v}.json > /dev/null 2>> $W/bench_tp_$v.log
  grep throughput $W/bench_tp_$v.log | sed "s/^/$v /" >> $W/summary.txt
done
cd $OUT && tar czf run10.tgz w && rm -rf w
