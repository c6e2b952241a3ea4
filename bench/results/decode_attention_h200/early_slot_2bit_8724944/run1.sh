#!/usr/bin/env bash
# Call 1 (thirty-third session): the 2-bit early slot A/B, the [attention] tests of the new build,
# then the grid with its SDPA peer.
set -u
cd .gpubin && for f in bda_old bda_new; do xz -dk $f.xz && chmod +x $f; done && cd ..
t0=$(date +%s)
OUT=$OUT/ab BITS=2,4 BATCH=1,16,64 CTX=4096,16384 EXTRA="--min-time-ms 200" \
  timeout 200 bash bench/ab_decode.sh bda_old bda_new > $OUT/ab_table.txt 2>&1
cat $OUT/ab_table.txt; echo "ab: $(( $(date +%s) - t0 )) s"
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz && source /tmp/g/pk/env.sh
t1=$(date +%s)
timeout 200 /tmp/g/pk/pmkv_test_gpu_kernels "[attention]" > $OUT/test_attention.log 2>&1
echo "attention tests rc=$? in $(( $(date +%s) - t1 )) s"; tail -3 $OUT/test_attention.log
left=$(( 560 - ($(date +%s) - t0) ))
echo "grid gets $left s"
mkdir -p $OUT/grid
COMMIT=$(cat /tmp/g/pk/COMMIT) timeout $left bash bench/run_decode_bench.sh .gpubin/bda_new $OUT/grid --min-time-ms 200 > $OUT/grid_log.txt 2>&1
echo "grid rc=$?"; tail -60 $OUT/grid/decode_attention.md 2>/dev/null
cd $OUT && tar czf grid.tgz grid && rm -rf grid ab/*_r1.jsonl 2>/dev/null; ls $OUT $OUT/ab
