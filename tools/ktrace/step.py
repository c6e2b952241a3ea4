#!/usr/bin/env python3
"""Where a decode step's time goes outside its decoder layers, from a ktrace CSV
(tools/ktrace/ktrace.cpp): for steps FIRST..LAST (a step starts at its embedding kernel), the step's
period, the idle time before its first kernel, and the first HEAD and last TAIL kernels with how
long each keeps the critical path after the previous kernel's end (medians over the steps, us).

usage: step.py TRACE.csv [FIRST LAST [HEAD TAIL]]
"""
import collections
import statistics
import sys

from ktrace_csv import int_arg, load


def short(name):
    for key in ("bulk_gemm_kernel", "skinny_gemm", "decode_split", "rope_kv", "embedding",
                "add_rmsnorm", "sampl", "gather", "silu", "prefill"):
        if key in name:
            return key
    return name[:40]


def main():
    first = int_arg(2, 5)
    last = int_arg(3, 20)
    head = int_arg(4, 4)
    tail = int_arg(5, 8)
    ev = load(sys.argv[1])
    steps = [i for i, e in enumerate(ev) if "embedding" in e[2]]
    period, idle, kernels = [], [], []
    pos = collections.defaultdict(list)
    names = {}
    for s in range(first, min(last + 1, len(steps) - 1)):
        seq = ev[steps[s]:steps[s + 1]]
        prev_end = max(e[1] for e in ev[steps[s - 1]:steps[s]])
        period.append((ev[steps[s + 1]][0] - seq[0][0]) / 1e3)
        idle.append((seq[0][0] - prev_end) / 1e3)
        kernels.append(len(seq))
        ends = [prev_end]
        for e in seq:
            ends.append(max(ends[-1], e[1]))
        for j in list(range(head)) + list(range(len(seq) - tail, len(seq))):
            key = j if j < head else j - len(seq)
            pos[key].append(((ends[j + 1] - ends[j]) / 1e3, (seq[j][1] - seq[j][0]) / 1e3))
            names[key] = short(seq[j][2])
    med = statistics.median
    print(f"{len(period)} steps: period {med(period):.1f} us, idle before the first kernel "
          f"{med(idle):.1f} us, {med(kernels):.0f} kernels")
    for key in sorted(pos, key=lambda k: (k < 0, k)):
        v = pos[key]
        print(f"  [{key:4d}] {names[key]:18s} on path {med(x[0] for x in v):7.1f} us, "
              f"runs {med(x[1] for x in v):7.1f} us")


if __name__ == "__main__":
    main()
