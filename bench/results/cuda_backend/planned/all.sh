#!/usr/bin/env bash
# The planned device calls in one (each script's header says what to build here and put in
# .gpubin/; ~35 MB with all of them): the bulk GEMM's producer variants with their tests, the same
# variants end to end (batch 1, batches 4 and 8), the weight stream with more producer warps, the
# small kernels against their floors. Most decisive first: a part gets at most its own limit or
# what is left of 570 s. Each part's files come back as one tarball (the run tool returns at most
# 8 files).
set -u
P=bench/results/cuda_backend/planned
t_start=$(date +%s)
for spec in bulk_producers:180 batch1_producers:240 weight_stream_producers:120 layer_ops:90; do
  part=${spec%:*} lim=${spec#*:}
  left=$((570 - ($(date +%s) - t_start)))
  [ "$left" -lt "$lim" ] && lim=$left
  if [ "$lim" -lt 20 ]; then echo "$part: not run (the call's time is spent)"; continue; fi
  mkdir -p $OUT/$part
  OUT=$OUT/$part timeout "$lim" bash $P/$part.sh
  echo "$part rc=$? in $(($(date +%s) - t_start)) s since the start"
  tar -C $OUT -czf $OUT/$part.tgz $part && rm -rf $OUT/$part
done
