#!/usr/bin/env bash
set -u
W=$OUT/w; mkdir -p $W
mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpubin/pk.txz
source /tmp/g/pk/env.sh
G=/tmp/g/pk
tar -C /tmp -xJf .gpubin/var.txz; V=/tmp/var; cp $G/bench_skinny_gemm $V/bsg_hint
ls /usr/local/cuda/bin > $W/cudabin.txt 2>&1
for b in bsg_hint bsg_nohint bsg_sync bsg_sync_nohint; do
  timeout 60 $V/$b --rows 1 > $W/$b.json 2> $W/$b.txt; echo "$b rc=$?" >> $W/summary.txt
  grep -E "bulk |illegal" $W/$b.txt | cut -c1-120 >> $W/summary.txt
done
CS=$(ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || which compute-sanitizer)
echo "cs=$CS" >> $W/summary.txt
timeout 240 $CS --tool memcheck --print-limit 3 $G/pmkv_test_gpu_kernels "skinny gemm: the bulk kernel over m, n, k and machine sizes that split tiles" > $W/sanitizer.txt 2>&1; echo "sanitizer rc=$?" >> $W/summary.txt
grep -m12 -E "=========" $W/sanitizer.txt >> $W/summary.txt
/usr/local/cuda/bin/cuobjdump -sass $V/bsg_sync > $W/sass_bsg.txt 2>&1; echo "cuobjdump rc=$?" >> $W/summary.txt
cd $OUT && tar czf run4.tgz w && rm -rf w
