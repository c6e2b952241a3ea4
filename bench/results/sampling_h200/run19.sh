#!/usr/bin/env bash
# Session 21, call 6: where the sampling kernel's selection passes stall (Nsight Compute).
S=$OUT/summary.txt; : > $S
B=.gpubin/bs/bench_sampling
ncu --kernel-name sampling_kernel --launch-skip 3 --launch-count 1 --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
  $B --rows 1 --iters 5 --modes topk50 > $OUT/ncu_topk50.txt 2>&1; echo "ncu rc=$?" >> $S
ncu --kernel-name sampling_kernel --launch-skip 3 --launch-count 1 --section WarpStateStats --section SchedulerStats \
  $B --rows 1 --iters 5 --modes t1 > $OUT/ncu_t1.txt 2>&1; echo "ncu t1 rc=$?" >> $S
ncu --kernel-name sampling_kernel --launch-skip 3 --launch-count 1 --set full --import-source yes -o $OUT/topk50 \
  $B --rows 1 --iters 5 --modes topk50 > /dev/null 2>&1; echo "ncu full rc=$?" >> $S
ncu --import $OUT/topk50.ncu-rep --page source --csv --print-source sass > $OUT/topk50_sass.csv 2>&1; echo "sass rc=$?" >> $S
cuobjdump -sass $B > $OUT/sass.txt 2>&1; echo "cuobjdump rc=$?" >> $S
grep -E "Stall|Warp Cycles|Issued|Eligible|Active Warps" $OUT/ncu_topk50.txt | head -40 >> $S
echo ---- >> $S
grep -E "Stall|Warp Cycles|Issued|Eligible" $OUT/ncu_t1.txt | head -20 >> $S
cd $OUT && tar -cJf ncu.txz ncu_*.txt topk50_sass.csv sass.txt && rm -f ncu_*.txt topk50_sass.csv sass.txt
ls -la $OUT >> $S
cat $S
