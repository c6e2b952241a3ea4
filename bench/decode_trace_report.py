#!/usr/bin/env python3
"""Summarizes the decode kernel's CTA-timeline probe (PMKV_DECODE_TRACE builds, bench/README.md).

Input: trace_b<bits>_B<batch>_T<ctx>_m<min item KiB>.txt files written by bench_decode_attention
built with -DPMKV_DECODE_TRACE, one line per CTA: row, SM id, then time stamps in ns after the
launch's earliest CTA entry (1 entry, 2 q loaded, 3 first tile ready, 4-7 warps' loop ends, 8
epilogue done, 9 merge done; -1 unset), item, tiles. Prints, per file, the spread (min / median /
max, microseconds) of each phase over the CTAs, and the slowest and fastest SMs' loop ends.
"""
import statistics
import sys
from collections import defaultdict


def spread(values):
    v = sorted(values)
    return f"min {v[0] / 1e3:6.1f}  p50 {v[len(v) // 2] / 1e3:6.1f}  max {v[-1] / 1e3:6.1f}"


def report(path):
    rows = [list(map(int, line.split())) for line in open(path) if line.strip()]
    # Columns: 0 row, 1 SM, 2..10 slots 1..9, 11 item, 12 tiles.
    entry = [r[2] for r in rows]
    loop_end = [max(r[5:9]) for r in rows]
    print(f"{path}: {len(rows)} CTAs on {len({r[1] for r in rows})} SMs")
    print("  entry                ", spread(entry))
    print("  q loaded - entry     ", spread([r[3] - r[2] for r in rows]))
    print("  first tile - entry   ", spread([r[4] - r[2] for r in rows if r[4] >= 0]))
    print("  loop end             ", spread(loop_end))
    print("  warps' loop-end range", spread([max(r[5:9]) - min(r[5:9]) for r in rows]))
    print("  epilogue             ", spread([r[9] - max(r[5:9]) for r in rows]))
    print("  merge step           ", spread([r[10] - r[9] for r in rows]))
    print("  CTA end              ", spread([r[10] for r in rows]))
    per_sm = defaultdict(list)
    for r, end in zip(rows, loop_end):
        per_sm[r[1]].append(end / 1e3)
    by_end = sorted(per_sm.values(), key=max)
    fmt = lambda v: "(" + ", ".join(f"{x:.1f}" for x in sorted(v)) + ")"
    print("  CTAs per SM          ", sorted({len(v) for v in per_sm.values()}))
    print("  fastest SMs' loop ends", " ".join(fmt(v) for v in by_end[:4]))
    print("  slowest SMs' loop ends", " ".join(fmt(v) for v in by_end[-4:]))
    inner = [max(v) - min(v) for v in per_sm.values() if len(v) > 1]
    if inner:
        print(f"  loop-end range inside an SM: median {statistics.median(inner):.1f} "
              f"max {max(inner):.1f}")
    by_rank(rows)


def ranked_sms(rows):
    """The CTA rows of each SM that holds the most CTAs, each SM's sorted by entry (ties: row)."""
    per_sm = defaultdict(list)
    for r in rows:
        per_sm[r[1]].append(r)
    n = max(len(v) for v in per_sm.values())
    return [sorted(v, key=lambda r: (r[2], r[0])) for v in per_sm.values() if len(v) == n]


def by_rank(rows):
    """Do equal items end in the order their CTAs arrived on the SM? (At 2 bits they do:
    bench/RESULTS.md, thirty-second session.)"""
    full = ranked_sms(rows)
    n = len(full[0])
    if n < 2:
        return
    print(f"  by entry rank ({len(full)} SMs with {n} CTAs; p50 us, tiles):")
    for k in range(n):
        col = [v[k] for v in full]
        med = lambda f: statistics.median(f(r) for r in col)
        print(f"    rank {k}: first tile {med(lambda r: r[4]) / 1e3:6.1f}  loop end "
              f"{med(lambda r: max(r[5:9])) / 1e3:6.1f}  tiles {med(lambda r: r[12]):.0f}")
    in_order = sum(1 for v in full
                   if sorted(v, key=lambda r: max(r[5:9])) == v)
    print(f"    SMs whose CTAs' loops end in entry order: {in_order} of {len(full)}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        report(p)
