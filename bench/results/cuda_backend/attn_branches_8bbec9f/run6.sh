#!/usr/bin/env bash
# Session 18, call 6: decode attention per bit-width on parallel branches (PMKV_ATTN_FORK=each|16|0).
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh && export PMKV_SOURCE_DIR=$PWD
S=$OUT/summary.txt; : > $S
B="/tmp/g/pk/bench_cuda_backend --model bench/configs/llama3-8b --load-format dummy --scenarios throughput --throughput-steps 12"
for r in 1 2; do
  for f in each 16 0; do
    env $( [ $f != each ] && echo PMKV_ATTN_FORK=$f ) $B --batches 1 --contexts 4096,16384,65536 --bits 16,4,2 --out $OUT/b1_${f}_r$r.json 2>&1 | grep -i "tokens/s" | sed "s/^/r$r fork=$f /" >> $S
    env $( [ $f != each ] && echo PMKV_ATTN_FORK=$f ) $B --batches 16,64 --contexts 4096,16384 --bits 4,2 --out $OUT/b16_${f}_r$r.json 2>&1 | grep -i "tokens/s" | sed "s/^/r$r fork=$f /" >> $S
  done
done
/tmp/g/pk/pmkv_test_gpu_backend > $OUT/gpu_backend.txt 2>&1; echo "gpu_backend rc=$?" >> $S; grep -A3 "parallel branches\|bit-widths at once" $OUT/gpu_backend.txt | head -20 >> $S; tail -3 $OUT/gpu_backend.txt >> $S
cd $OUT && tar -cJf json.txz *.json gpu_backend.txt && rm *.json gpu_backend.txt
sort -t' ' -k3 $S | head -0; cat $S
