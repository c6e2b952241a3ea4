#!/usr/bin/env bash
# The thirty-third session's three planned device calls in one (each script's header says what to
# build here and put in .gpubin/): the weight stream with more producer warps, the bulk GEMM's
# producer variants with their tests, the small kernels against their floors. Each part's files
# come back as one tarball (the run tool returns at most 8 files).
set -u
P=bench/results/cuda_backend/planned
for part in weight_stream_producers bulk_producers layer_ops; do
  mkdir -p $OUT/$part
  OUT=$OUT/$part timeout 180 bash $P/$part.sh
  echo "$part rc=$?"
  tar -C $OUT -czf $OUT/$part.tgz $part && rm -rf $OUT/$part
done
