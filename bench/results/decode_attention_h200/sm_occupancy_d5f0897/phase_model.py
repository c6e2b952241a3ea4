#!/usr/bin/env python3
"""An SM's rate with k CTAs resident, S(k), from the launches of 1..4 CTAs an SM (this folder's
tr/trace_b2_B{33,66,99,132}_T16384_m16.txt), and what the 3- and 4-CTA launches would take if
every CTA ran at the full rate to the end. Each launch of n CTAs an SM has phases: n CTAs until
the first (by entry rank, medians over SMs) ends, n - 1 until the second, ...; with S(1..n-1) from
the smaller launches, S(n) is what makes the n items' work add up. Run from the repository root."""
import statistics
import sys

sys.path.insert(0, "bench")
from decode_trace_report import ranked_sms  # noqa: E402

DIR = "bench/results/decode_attention_h200/sm_occupancy_d5f0897/tr"


def rank_ends(path):
    rows = [list(map(int, line.split())) for line in open(path) if line.strip()]
    full = ranked_sms(rows)
    n = len(full[0])
    start = statistics.median(v[0][4] for v in full)
    return [(statistics.median(max(v[k][5:9]) for v in full) - start) / 1e3 for k in range(n)]


S = [None]
for n in (1, 2, 3, 4):
    e = rank_ends(f"{DIR}/trace_b2_B{33 * n}_T16384_m16.txt")
    tail = sum((e[j] - e[j - 1]) * S[n - j] for j in range(1, n))
    S.append((n - tail) / e[0])
    print(f"{n} CTAs an SM: loops end {', '.join(f'{x:.1f}' for x in e)} us after the first tile; "
          f"S({n}) = {S[n] / S[1]:.2f} S(1); at S({n}) to the end: {n / S[n]:.1f} us "
          f"({n / S[n] / e[-1] - 1:+.1%})")
