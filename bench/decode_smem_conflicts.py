#!/usr/bin/env python3
"""Shared-memory bank conflicts of the decode kernel's tile reads (kernels/attention/decode_kernel.cuh).

Replays, in Python, the byte offsets LaneOffsets gives each lane for its K-phase and V-phase reads
of a stage (token order sigma, the lanes' chunks, the code layout) and counts the wavefronts each
warp-wide read needs: 16-byte reads go out in phases of 8 lanes, 8-byte reads in phases of 16,
narrower ones as one phase; a phase needs as many wavefronts as the most distinct 32-bit words any
one bank holds. Conflict-free is one wavefront per phase.

"xor" is the kernel's layout (XOR swizzle, sigma(k) = k ^ bit 2 of k): conflict-free except at
16 bits and head_dim 128, where every read takes two wavefronts, and the 2-byte V-phase reads of
2 bits at head_dim 64 (6 wavefronts where 4 would do). "swizzle128" is the alternative
tried for 16 bits in the eighth session (the 128-byte swizzle pattern, sigma16 = (k & 8) |
{0, 6, 1, 7, 2, 4, 3, 5}[k & 7], K-phase chunks tig + 4i, V-phase chunks gid + 8g, or gid / 2 +
4 (gid % 2) at head_dim 64): conflict-free, but not faster on the H200 (bench/RESULTS.md), so the
kernel kept "xor". Exits non-zero if that alternative layout stops being conflict-free (a guard for
whoever picks it up again).

    python3 bench/decode_smem_conflicts.py
"""
import sys


def sigma_xor(k):
    return k ^ ((k >> 2) & 1)


def sigma_16(k):
    return (k & 8) | ((0x53427160 >> (4 * (k & 7))) & 7)


def reads(bits, dim, sw128):
    row = dim * bits // 8
    chunks = row // 16
    kbytes, vbytes = row // 4, row // 8
    kread, vread = min(16, kbytes), min(16, vbytes)
    sig = sigma_16 if sw128 else sigma_xor

    def code_offset(t, x):
        if sw128:
            lin = t * row + x
            return lin ^ (((lin >> 7) & 7) << 4)
        swz = (t & (chunks - 1)) if chunks > 1 else 0
        return t * row + (((x >> 4) ^ swz) << 4) + (x & 15)

    def k_byte(tig, x):
        return 16 * (4 * (x // 16) + tig) + x % 16 if sw128 else tig * kbytes + x

    def v_byte(gid, g):
        if sw128:
            c = gid + 8 * g if dim == 128 else gid // 2 + 4 * (gid % 2)
            return 16 * c
        return gid * vbytes + g * vread

    out = []
    for j in range(2):
        for i in range(kbytes // kread):
            out.append(('K', kread, [code_offset(sig(8 * j + (l >> 2)), k_byte(l & 3, i * kread))
                                     for l in range(32)]))
    def v_rows(tig):  # the V phase's tokens of lane tig: mma k 2 tig, 2 tig + 1, + 8, + 9
        return [sig(2 * tig), sig(2 * tig + 1), sig(2 * tig + 8), sig(2 * tig + 9)]

    for g in range(vbytes // vread):
        for r in range(4):
            out.append(('V', vread, [code_offset(v_rows(l & 3)[r], v_byte(l >> 2, g))
                                     for l in range(32)]))
    return out


def wavefronts(width, addrs):
    per_phase = {16: 8, 8: 16}.get(width, 32)
    total = 0
    for p in range(0, 32, per_phase):
        banks = {}
        for a in addrs[p:p + per_phase]:
            for w in range(a // 4, (a + max(width, 4) - 1) // 4 + 1):
                banks.setdefault(w % 32, set()).add(w)
        total += max(len(s) for s in banks.values())
    return total, 32 // per_phase


def main():
    bad = False
    print('bits dim layout        K wavefronts (ideal)  V wavefronts (ideal)')
    for bits in (16, 8, 4, 2):
        for dim in (128, 64):
            layouts = [('xor', False)] + ([('swizzle128', True)] if bits == 16 else [])
            for name, sw in layouts:
                sums = {'K': [0, 0], 'V': [0, 0]}
                for phase, width, addrs in reads(bits, dim, sw):
                    w, ideal = wavefronts(width, addrs)
                    sums[phase][0] += w
                    sums[phase][1] += ideal
                print(f'{bits:4} {dim:3} {name:12} {sums["K"][0]:5} ({sums["K"][1]:3})'
                      f'             {sums["V"][0]:5} ({sums["V"][1]:3})')
                if sw and (sums['K'][0] != sums['K'][1] or sums['V'][0] != sums['V'][1]):
                    bad = True
    sys.exit(1 if bad else 0)


if __name__ == '__main__':
    main()
