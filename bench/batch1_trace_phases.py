#!/usr/bin/env python3
"""Summarizes the batch-1 decode-attention timeline that bench_cuda_backend writes when built with
-DPMKV_DECODE_TRACE ($PMKV_TRACE_DIR/batch1_decode_trace.txt: the last step's last layer, one line
per CTA: row, then the kDecodeTraceSlots raw slots of kernels/attention/decode_kernel.cuh, slot 0
the SM id, the others %globaltimer ns or 0 when unset).

Prints, per file, min / median / max over the CTAs of each stamp in us after the launch's earliest
CTA entry, in the order a CTA passes them. The merge stamps (21, 9) of the CTA that merges are the
max column; the slots can hold an earlier launch's values (negative), which are left out.

usage: batch1_trace_phases.py TRACE.txt...
"""
import statistics
import sys

STAMPS = [(1, "entry"), (16, "offsets"), (15, "past wait"), (17, "first slots"), (18, "q arrived"),
          (2, "q loaded"), (3, "first tile"), (4, "warp 0 end"), (5, "warp 1 end"), (6, "warp 2 end"),
          (7, "warp 3 end"), (19, "epilogue sync"), (20, "states in smem"), (8, "epilogue done"),
          (21, "merge counted"), (9, "merge done")]


def main():
    for path in sys.argv[1:]:
        rows = [list(map(int, line.split())) for line in open(path) if line.strip()]
        t0 = min(r[2] for r in rows if r[2] > 0)
        print(f"{path}: {len(rows)} CTAs")
        for slot, name in STAMPS:
            col = slot + 1
            v = [(r[col] - t0) / 1e3 for r in rows if len(r) > col and r[col] >= t0]
            if v:
                print(f"  {name:15s} n {len(v):3d}  min {min(v):6.2f}  p50 {statistics.median(v):6.2f}"
                      f"  max {max(v):6.2f}")


if __name__ == "__main__":
    main()
