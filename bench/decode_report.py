#!/usr/bin/env python3
"""Joins bench_decode_attention and sdpa_peer.py JSON lines into one JSON file per point
(decode_attention_<bits>b_B<batch>_T<ctx>.json) and a markdown table (decode_attention.md)."""
import argparse
import json
import os


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--command", default="")
    a = ap.parse_args()
    peer = {(r["batch"], r["context"]): r for r in load(a.peer)}
    rows = []
    for r in load(a.ours):
        p = peer.get((r["batch"], r["context"]), {})
        r = dict(r)
        r["commit"] = a.commit
        r["command"] = a.command
        r["peer"] = "torch.nn.functional.scaled_dot_product_attention, bf16 K/V, " + \
            p.get("mode", "n/a")
        r["peer_time_us"] = p.get("time_us")
        r["peer_effective_gbps"] = p.get("effective_gbps")
        if "time_us" in r and p.get("time_us"):
            r["speedup_vs_peer"] = p["time_us"] / r["time_us"]
            r["peer_fraction_of_copy_bandwidth"] = p["effective_gbps"] / r["copy_gbps"]
            if r.get("read_floor_us"):  # the speedup a kernel at the read floor would have
                r["speedup_ceiling_vs_peer"] = p["time_us"] / r["read_floor_us"]
        name = f"decode_attention_{r['bits']}b_B{r['batch']}_T{r['context']}.json"
        with open(os.path.join(a.out_dir, name), "w") as f:
            json.dump(r, f, indent=1)
        rows.append(r)
    copy = next((r["copy_gbps"] for r in rows if "copy_gbps" in r), None)
    lines = [f"Device: {rows[0].get('device', '?') if rows else '?'}; copy bandwidth "
             f"{copy:.0f} GB/s (read + write); commit {a.commit}", "",
             "| bits | batch | context | time (us) | GB/s | of copy BW | SDPA bf16 (us) | "
             "SDPA of copy BW | speedup vs SDPA | read floor (us) | ceiling vs SDPA |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "time_us" not in r:
            lines.append(f"| {r['bits']} | {r['batch']} | {r['context']} | skipped | | | | | | | |")
            continue
        pt = r.get("peer_time_us")
        fl = r.get("read_floor_us")
        ceil = r.get("speedup_ceiling_vs_peer")
        lines.append(
            f"| {r['bits']} | {r['batch']} | {r['context']} | {r['time_us']:.1f} | "
            f"{r['effective_gbps']:.0f} | {100 * r['fraction_of_copy_bandwidth']:.0f}% | "
            + (f"{pt:.1f} | {100 * r['peer_fraction_of_copy_bandwidth']:.0f}% | "
               f"{r['speedup_vs_peer']:.2f}x |" if pt else "n/a | | |")
            + (f" {fl:.1f} |" if fl else " n/a |")
            + (f" {ceil:.2f}x |" if ceil else " n/a |"))
    with open(os.path.join(a.out_dir, "decode_attention.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
