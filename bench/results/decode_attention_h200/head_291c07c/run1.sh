#!/usr/bin/env bash
# 28th session call 1: 16-bit A/B 5d9390b vs HEAD, HEAD attention tests, 16-bit grid, ncu of 2/4-bit points.
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,driver_version --format=csv > $W/smi.txt
timeout 200 /tmp/g/pk/pmkv_test_gpu_kernels "[attention]" > $W/test_attn.log 2>&1; echo "attn tests rc=$?" >> $W/summary.txt
tail -3 $W/test_attn.log >> $W/summary.txt
OUT=$W/ab16 BITS=16 BATCH=1,16,64 CTX=1024,4096,16384,65536 bash bench/ab_decode.sh bda_old bda_head > $W/ab16.txt 2>&1
cat $W/ab16.txt >> $W/summary.txt
BITS=16 COMMIT=291c07c bash bench/run_decode_bench.sh .gpubin/bda_head $W/grid16 --min-time-ms 200 > $W/grid16.log 2>&1
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
echo "ncu: $NCU" >> $W/summary.txt
A="--kv-heads 8 --group 4 --head-dim 128 --tokens16 32 --min-time-ms 20"
for p in "2 16 16384" "2 64 4096" "2 64 16384" "2 16 65536" "4 16 16384" "4 64 4096" "16 16 4096"; do
  set -- $p
  n=n$1_$2x$3
  timeout 120 $NCU --clock-control none --set full --import-source no -k regex:decode_split --launch-skip 5 --launch-count 1 \
    -o $W/$n .gpubin/bda_head $A --bits $1 --batch $2 --ctx $3 > $W/$n.log 2>&1
  echo "$n rc=$?" >> $W/summary.txt
  $NCU -i $W/$n.ncu-rep --page raw --csv > $W/$n.raw.csv 2>>$W/$n.log
  $NCU -i $W/$n.ncu-rep --page details > $W/$n.details.txt 2>>$W/$n.log
  $NCU -i $W/$n.ncu-rep --page source --csv --print-source sass > $W/$n.sass.csv 2>>$W/$n.log
done
cat $W/summary.txt
cd $OUT && tar czf run1.tgz w && rm -rf w
