"""Shared by the ktrace summaries: a trace CSV's records (ktrace.cpp) sorted by start, and the
scripts' optional integer arguments."""
import sys


def load(path):
    """[(start_ns, end_ns, name)] of every record, sorted by start."""
    ev = []
    for line in open(path):
        start, end, _node, name = line.rstrip("\n").split(",", 3)
        ev.append((int(start), int(end), name))
    ev.sort()
    return ev


def int_arg(i, default):
    """sys.argv[i] as an int, or `default` when absent."""
    return int(sys.argv[i]) if len(sys.argv) > i else default
