#!/usr/bin/env bash
# 28th session call 3: the whole grid at 291c07c with its SDPA peer, twice (the grid's spread between calls).
set -u
W=$OUT/w; mkdir -p $W
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > $W/smi.txt
COMMIT=291c07c bash bench/run_decode_bench.sh .gpubin/bda_head $W/grid --min-time-ms 200 > $W/grid.log 2>&1
BITS=4,2 BATCH=16,64 CTX=4096,16384,65536 COMMIT=291c07c bash bench/run_decode_bench.sh .gpubin/bda_head $W/grid_b --min-time-ms 200 > $W/grid_b.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv >> $W/smi.txt
cat $W/grid/decode_attention.md; cat $W/grid_b/decode_attention.md
cd $OUT && tar czf run3.tgz w && rm -rf w
