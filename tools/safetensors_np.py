#!/usr/bin/env python3
"""Minimal safetensors reader/writer on numpy (no other dependency).

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian
u64 N, then N bytes of UTF-8 JSON header, then the data buffer. The header
maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the start of the data buffer) plus an optional "__metadata__"
string->string map.

What this module writes:
  * tensors in name order, data_offsets contiguous from 0, no holes;
  * header keys sorted ("__metadata__" first when present);
  * header padded with spaces so that 8 + N is a multiple of 8 (the format
    allows trailing whitespace), so the data buffer starts 8-byte aligned.

Supported dtypes: BF16, F16, F32 (plus F64, I8/U8/I16/I32/I64 for
convenience). BF16 has no numpy dtype: it is carried as uint16 bit patterns,
either wrapped in `Bf16` for writing, or returned as uint16 / converted to
float32 when reading. `f32_to_bf16_bits` rounds to nearest, ties to even
(NaN stays NaN), the same as torch's float32 -> bfloat16 cast.

API:
  read_header(path) -> (header_dict, data_start)
  load(path, bf16="f32"|"u16", names=None) -> dict[name, np.ndarray]
  load_model_dir(dir, bf16=...) -> dict (model.safetensors or sharded via
      model.safetensors.index.json)
  save(path, tensors, metadata=None)   values: np.ndarray or Bf16(uint16 arr)
  f32_to_bf16_bits(x) / bf16_bits_to_f32(u16)
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

__all__ = [
    "Bf16",
    "SafetensorsError",
    "bf16_bits_to_f32",
    "f32_to_bf16_bits",
    "load",
    "load_model_dir",
    "read_header",
    "save",
]

# dtype string -> (numpy dtype of the stored bytes, bytes per element)
_DTYPES = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {
    np.dtype("float16"): "F16",
    np.dtype("float32"): "F32",
    np.dtype("float64"): "F64",
    np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8",
    np.dtype("int16"): "I16",
    np.dtype("int32"): "I32",
    np.dtype("int64"): "I64",
    np.dtype("bool"): "BOOL",
}
_MAX_HEADER = 100 * 1024 * 1024  # same limit as the reference implementation


class SafetensorsError(ValueError):
    pass


class Bf16:
    """A tensor to be written as BF16, given as uint16 bit patterns."""

    def __init__(self, bits: np.ndarray):
        bits = np.asarray(bits)
        if bits.dtype != np.uint16:
            raise TypeError(f"Bf16 wants uint16 bit patterns, got {bits.dtype}")
        self.bits = bits

    @classmethod
    def from_float(cls, x: np.ndarray) -> "Bf16":
        return cls(f32_to_bf16_bits(x))

    @property
    def shape(self):
        return self.bits.shape


def f32_to_bf16_bits(x) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), round to nearest even."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        # keep sign, force a quiet NaN (rounding could otherwise make it Inf)
        rounded = np.where(nan, ((u >> 16).astype(np.uint16) & 0x8000) | 0x7FC0, rounded).astype(np.uint16)
    return rounded.reshape(x.shape)


def bf16_bits_to_f32(bits) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    b = np.ascontiguousarray(np.asarray(bits, dtype=np.uint16))
    return (b.astype(np.uint32) << 16).view(np.float32).reshape(b.shape)


def read_header(path: str) -> Tuple[dict, int]:
    """Returns (header, data_start). Validates the layout against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: file too small for a safetensors header ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} is invalid for a file of {size} bytes")
        hdr_bytes = f.read(n)
    try:
        header = json.loads(hdr_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry: {info!r}") from None
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if not (0 <= b <= e <= data_len) or e - b != nbytes:
            raise SafetensorsError(
                f"{path}: tensor {name!r} offsets [{b}, {e}) do not fit dtype {dtype} shape {shape} "
                f"({nbytes} bytes) in a data buffer of {data_len} bytes")
        spans.append((b, e, name))
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            raise SafetensorsError(f"{path}: data buffer has a hole or overlap before tensor {name!r} "
                                   f"(expected offset {pos}, got {b})")
        pos = e
    if pos != data_len:
        raise SafetensorsError(f"{path}: {data_len - pos} trailing bytes after the last tensor")
    return header, data_start


def load(path: str, bf16: str = "f32", names: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """Loads tensors. bf16="f32" converts BF16 to float32, "u16" returns the raw bit patterns."""
    if bf16 not in ("f32", "u16"):
        raise ValueError("bf16 must be 'f32' or 'u16'")
    header, data_start = read_header(path)
    wanted = None if names is None else set(names)
    out: Dict[str, np.ndarray] = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for name, info in header.items():
            if name == "__metadata__" or (wanted is not None and name not in wanted):
                continue
            b, e = info["data_offsets"]
            dt = _DTYPES[info["dtype"]]
            arr = np.frombuffer(mm[data_start + b:data_start + e].tobytes(), dtype=dt).reshape(info["shape"])
            if info["dtype"] == "BF16" and bf16 == "f32":
                arr = bf16_bits_to_f32(arr)
            out[name] = arr
    finally:
        del mm
    if wanted is not None and wanted - set(out):
        raise SafetensorsError(f"{path}: missing tensors {sorted(wanted - set(out))}")
    return out


def load_model_dir(model_dir: str, bf16: str = "f32") -> Dict[str, np.ndarray]:
    """Loads every tensor of a Hugging Face model directory (single file or sharded)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        out: Dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            part = load(os.path.join(model_dir, shard), bf16=bf16)
            for k, v in part.items():
                if weight_map.get(k) != shard:
                    raise SafetensorsError(f"{shard}: tensor {k!r} is not mapped to this shard by the index")
                out[k] = v
        missing = set(weight_map) - set(out)
        if missing:
            raise SafetensorsError(f"{model_dir}: index names tensors found in no shard: {sorted(missing)}")
        return out
    if os.path.exists(single):
        return load(single, bf16=bf16)
    raise SafetensorsError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")


def save(path: str, tensors: Dict[str, object], metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes tensors (np.ndarray of a supported dtype, or Bf16) in name order."""
    entries = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise SafetensorsError("'__metadata__' is reserved")
        t = tensors[name]
        if isinstance(t, Bf16):
            st_dtype, arr = "BF16", np.ascontiguousarray(t.bits, dtype="<u2")
        else:
            arr = np.asarray(t)
            st_dtype = _NP_TO_ST.get(arr.dtype)
            if st_dtype is None:
                raise SafetensorsError(f"tensor {name!r}: unsupported numpy dtype {arr.dtype} "
                                       "(wrap uint16 bf16 bit patterns in Bf16)")
            arr = np.ascontiguousarray(arr, dtype=_DTYPES[st_dtype])
        nbytes = arr.nbytes
        entries.append((name, st_dtype, list(arr.shape), offset, offset + nbytes, arr))
        offset += nbytes
    header: Dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError("metadata must map strings to strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    for name, st_dtype, shape, b, e, _ in entries:
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [b, e]}
    hdr = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hdr += b" " * ((-len(hdr)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for *_, arr in entries:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def _selftest() -> None:
    import tempfile
    rng = np.random.default_rng(0)
    # bf16 rounding: compare with an exact reference via float64 arithmetic
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10,
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 3.0e38, 65504.0], np.float32)])
    bits = f32_to_bf16_bits(x)
    back = bf16_bits_to_f32(bits)
    finite = np.isfinite(x)
    # round-to-nearest-even reference: candidates are truncation and truncation + 1 ulp
    u = x.view(np.uint32)
    lo = (u & 0xFFFF0000).view(np.float32).astype(np.float64)
    hi_bits = ((u >> 16) + 1).astype(np.uint32) << 16
    xd = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        hi = hi_bits.view(np.float32).astype(np.float64)
        dlo, dhi = np.abs(xd - lo), np.abs(hi - xd)
        tie_even_lo = ((u >> 16) & 1) == 0
        ref = np.where((dlo < dhi) | ((dlo == dhi) & tie_even_lo), lo, hi)
    m = finite & np.isfinite(ref)
    assert np.array_equal(back[m].astype(np.float64), ref[m]), "bf16 rounding mismatch"
    assert np.isnan(back[np.isnan(x)]).all()
    # exact ties
    t = np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8], np.float32)  # halfway cases
    assert list(bf16_bits_to_f32(f32_to_bf16_bits(t))) == [1.0, 1.0 + 2 ** -6]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "t.safetensors")
        tensors = {"b": rng.standard_normal((3, 5)).astype(np.float32),
                   "a": Bf16.from_float(rng.standard_normal((7,))),
                   "c": rng.standard_normal((2, 2, 3)).astype(np.float16),
                   "z": np.zeros((0, 4), np.float32)}
        save(p, tensors, metadata={"format": "pt"})
        hdr, start = read_header(p)
        assert start % 8 == 0
        assert [k for k in hdr if k != "__metadata__"] == ["a", "b", "c", "z"]
        out = load(p, bf16="u16")
        assert np.array_equal(out["a"], tensors["a"].bits)
        assert np.array_equal(out["b"], tensors["b"]) and np.array_equal(out["c"], tensors["c"])
        assert out["z"].shape == (0, 4)
    print("safetensors_np self-test OK")


if __name__ == "__main__":
    _selftest()
