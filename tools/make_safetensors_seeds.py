#!/usr/bin/env python3
"""Writes the hand-made seed corpus of the safetensors fuzzer (tests/fuzz/corpus/seed-*).

Each seed is a tiny file image: valid files in every accepted dtype plus one of each malformed
kind the parser must reject. Run from anywhere; pass another output dir as argv[1] if wanted.
Only the standard library is used so that it runs without the project's virtualenv.
"""
import json
import os
import struct
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fuzz", "corpus")


def image(header, data=b"", length=None):
    """8-byte little-endian header length, header bytes, data buffer."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


f32 = struct.pack("<4f", 1.0, -2.0, 0.5, 3.0)
bf16 = struct.pack("<4H", 0x3F80, 0xC040, 0x0001, 0x7F80)
f16 = struct.pack("<4H", 0x3C00, 0x0001, 0x7C00, 0x7E00)

SEEDS = {
    # valid files
    "valid-f32": image({"w": entry("F32", [2, 2], 0, 16)}, f32),
    "valid-bf16": image({"w": entry("BF16", [4], 0, 8)}, bf16),
    "valid-f16": image({"w": entry("F16", [1, 4], 0, 8)}, f16),
    "valid-multi-metadata": image(
        {"__metadata__": {"format": "pt", "model.embed_tokens.weight": "lm_head.weight"},
         "lm_head.weight": entry("F32", [2, 2], 0, 16),
         "model.norm.weight": entry("BF16", [4], 16, 24),
         "model.layers.0.self_attn.q_proj.bias": entry("F16", [4], 24, 32)},
        f32 + bf16 + f16),
    "valid-empty-header": image({}),
    "valid-scalar-and-empty": image(
        {"s": entry("F32", [], 0, 4), "e": entry("F16", [0, 3], 4, 4)}, f32[:4]),
    "valid-padded": image(json.dumps({"w": entry("F32", [1], 0, 4)}) + "      ", f32),
    # malformed
    "bad-short": b"\x10\x00\x00",
    "bad-header-past-end": image("{}", length=64),
    "bad-header-absurd": image("{}", length=2**63),
    "bad-json": image('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'),
    "bad-not-object": image([1, 2, 3]),
    "bad-utf8": image(b'{"w\xc0\x80": 1}'),
    "bad-nul": image(b'{}\x00{"w": 1}'),
    "bad-entry-not-object": image({"w": "F32"}),
    "bad-missing-offsets": image({"w": {"dtype": "F32", "shape": [1]}}, f32),
    "bad-dtype": image({"w": entry("I64", [2], 0, 16)}, f32),
    "bad-negative-dim": image({"w": entry("F32", [-1], 0, 4)}, f32),
    "bad-float-dim": image({"w": entry("F32", [1.5], 0, 4)}, f32),
    "bad-overflow": image({"w": entry("F32", [2**32, 2**32], 0, 16)}, f32),
    "bad-begin-after-end": image({"w": entry("F32", [0], 8, 4)}, f32),
    "bad-end-past-data": image({"w": entry("F32", [8], 0, 32)}, f32),
    "bad-size-mismatch": image({"w": entry("F32", [3], 0, 16)}, f32),
    "bad-overlap": image({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, f32),
    "bad-duplicate": image('{"w":%s,"w":%s}' % (json.dumps(entry("F32", [1], 0, 4)),
                                                json.dumps(entry("F32", [1], 4, 8))), f32),
    "bad-metadata": image({"__metadata__": {"format": 1}}),
    "bad-deep": image('{"w":{"shape":[[[[[1]]]]]}}'),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in sorted(SEEDS.items()):
        with open(os.path.join(OUT, "seed-" + name), "wb") as f:
            f.write(data)
    print(f"wrote {len(SEEDS)} seeds to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
