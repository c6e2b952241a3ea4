#!/usr/bin/env bash
# 28th session call 2: spread launches. GPU tests, then an A/B of HEAD's bench, spread never / auto / always.
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
timeout 240 /tmp/g/pk/pmkv_test_gpu_kernels "[attention]" > $W/test_attn.log 2>&1; echo "attn tests rc=$?" >> $W/summary.txt
tail -3 $W/test_attn.log >> $W/summary.txt
OUT=$W/ab24 BITS=4,2 BATCH=16,48,64 CTX=16384,65536 bash bench/ab_decode.sh bda_head bda_never bda_new bda_always > $W/ab24.txt 2>&1
cat $W/ab24.txt >> $W/summary.txt
OUT=$W/ab16 BITS=16 BATCH=16,64 CTX=16384,65536 bash bench/ab_decode.sh bda_head bda_never bda_new bda_always > $W/ab16.txt 2>&1
cat $W/ab16.txt >> $W/summary.txt
OUT=$W/ab4k BITS=16,4,2 BATCH=1,16,64 CTX=4096 bash bench/ab_decode.sh bda_head bda_new bda_always > $W/ab4k.txt 2>&1
cat $W/ab4k.txt >> $W/summary.txt
timeout 200 /tmp/g/pk/pmkv_test_gpu_backend > $W/test_backend.log 2>&1; echo "gpu_backend rc=$?" >> $W/summary.txt
tail -3 $W/test_backend.log >> $W/summary.txt
cat $W/summary.txt
cd $OUT && tar czf run2.tgz w && rm -rf w
