#!/usr/bin/env bash
# Runs bench_decode_attention and its PyTorch SDPA peer, then writes one JSON per point and a
# markdown table. Usage (repository root):
#   COMMIT=$(git rev-parse HEAD) bench/run_decode_bench.sh [BIN] [OUT_DIR] [extra bench args...]
# BIN defaults to .gpubin/bench_decode_attention, OUT_DIR to bench/results. Writes
# decode_attention_<bits>b_B<batch>_T<ctx>.json per point, decode_attention.md (the table) and the
# raw JSON lines decode_attention_ours.jsonl / decode_attention_peer.jsonl.
set -euo pipefail
BIN=${1:-.gpubin/bench_decode_attention}
OUT_DIR=${2:-bench/results}
shift $(( $# > 2 ? 2 : $# )) || true
COMMIT=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
BITS=${BITS:-16,8,4,2}
BATCH=${BATCH:-1,16,64}
CTX=${CTX:-1024,4096,16384,65536}
mkdir -p "$OUT_DIR"
CMD="$BIN --bits $BITS --batch $BATCH --ctx $CTX --kv-heads 8 --group 4 --head-dim 128 --tokens16 ${TOKENS16:-32}"
echo "+ $CMD" >&2
$CMD --out "$OUT_DIR/decode_attention_ours.jsonl" "$@"
PEER="python3 bench/sdpa_peer.py --batch $BATCH --ctx $CTX --q-heads 32 --kv-heads 8 --head-dim 128"
echo "+ $PEER" >&2
PYTHONUNBUFFERED=1 $PEER --out "$OUT_DIR/decode_attention_peer.jsonl"
python3 bench/decode_report.py --ours "$OUT_DIR/decode_attention_ours.jsonl" --peer "$OUT_DIR/decode_attention_peer.jsonl" \
  --out-dir "$OUT_DIR" --commit "$COMMIT" --command "$CMD; $PEER"
