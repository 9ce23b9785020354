"""A small, validating, memory-mapped safetensors reader.

Reading the format ourselves (an 8-byte header length, a JSON header, raw
little-endian data) gives lazy `np.memmap` views — so a layer can be read without
the rest of the file — and precise errors for truncated or corrupt files.
bfloat16 is read through `ml_dtypes` (a JAX dependency).

Example:
    >>> import numpy as np, tempfile, os
    >>> from safetensors.numpy import save_file
    >>> f = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file({"a": np.ones((2, 3), np.float32)}, f)
    >>> open_safetensors(f)["a"].shape
    (2, 3)
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxprune.errors import CheckpointError
from jaxprune.io.untrusted import parse_json, short

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


MAX_HEADER_BYTES = 100_000_000   # the format's own limit
MAX_HEADER_DEPTH = 8             # a header is {name: {"shape": [...]}}: 3 levels
MAX_NDIM = 8


def read_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` string map of a safetensors header ({} when absent)."""
    return _read_raw_header(path)[0].get("__metadata__") or {}


def read_header(path: str) -> tuple[dict, int]:
    """(header dict without metadata, byte offset where tensor data begins)."""
    header, start = _read_raw_header(path)
    header.pop("__metadata__", None)
    return header, start


def _read_raw_header(path: str) -> tuple[dict, int]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                                      f"(header claims {n} bytes, file has {size})")
            text = f.read(n)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    header = parse_json(text, path, "safetensors header", MAX_HEADER_DEPTH)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    return header, 8 + n


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def check_entries(path: str, header: dict, data_len: int) -> dict[str, tuple[np.dtype, tuple, int, int]]:
    """name -> (dtype, shape, begin, end) of every tensor of a parsed header, each field checked:
    a known dtype, a shape of at most 8 non-negative ints, two ordered offsets inside the data
    section (`data_len` bytes) spanning exactly the shape's bytes, no two tensors overlapping."""
    out = {}
    for name, info in header.items():
        what = f"{path}: tensor {short(name)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{what}: corrupt header entry (a JSON {type(info).__name__})")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPES:
            raise CheckpointError(f"{what} has an unsupported or missing dtype {short(code, 40)}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) for d in shape):
            raise CheckpointError(f"{what}: shape must be at most {MAX_NDIM} non-negative integers, "
                                  f"got {short(shape, 60)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{what}: data_offsets must be two ordered non-negative integers, "
                                  f"got {short(offsets, 60)}")
        dtype = np.dtype(DTYPES[code])
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        need = count * dtype.itemsize
        if end - begin != need:
            raise CheckpointError(f"{what} {code}{short(shape, 60)} needs {short(need, 30)} bytes "
                                  f"but the header gives {end - begin}")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated file: tensor {short(name)} ends at byte {end} of the data "
                                  f"section but only {data_len} bytes are present")
        out[name] = (dtype, tuple(shape), begin, end)
    spans = sorted((b, e, n) for n, (_, _, b, e) in out.items() if e > b)
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {short(n0)} and {short(n1)} overlap in the data section")
    return out


def open_safetensors(path: str) -> dict[str, np.ndarray]:
    """name -> read-only memory-mapped numpy array, validated against the file size."""
    header, start = read_header(path)
    data_len = os.path.getsize(path) - start
    entries = check_entries(path, header, data_len)
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len else None
    return {name: mm[begin:end].view(dtype).reshape(shape) if end > begin else np.zeros(shape, dtype)
            for name, (dtype, shape, begin, end) in entries.items()}


def tensor_locations(path: str) -> dict[str, tuple[np.dtype, tuple, int]]:
    """name -> (dtype, shape, absolute byte offset) of every tensor in a safetensors file (validated
    like `open_safetensors`), for reading one tensor at a time with `read_tensor`."""
    header, start = read_header(path)
    entries = check_entries(path, header, os.path.getsize(path) - start)
    return {name: (dtype, shape, start + begin) for name, (dtype, shape, begin, _) in entries.items()}


def read_tensor(path: str, location: tuple[np.dtype, tuple, int], transpose: bool = False) -> np.ndarray:
    """One tensor copied into ordinary memory through a map of just its bytes, dropped afterwards, so
    the file's pages do not stay resident in this process."""
    dtype, shape, offset = location
    if not int(np.prod(shape, dtype=np.int64)):
        return np.zeros(shape[::-1] if transpose else shape, dtype)
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    out = np.ascontiguousarray(mm.T if transpose else mm)
    del mm
    return out


_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def write_safetensors(path: str, specs: dict[str, tuple[np.dtype, tuple]], produce, metadata=None) -> None:
    """Write a safetensors file one tensor at a time: `specs` gives each name's (dtype, shape) for the
    header and `produce(name)` returns its array only when it is written, so a file larger than
    memory can be written."""
    names = sorted(specs)
    header, offset = {}, 0
    for name in names:
        dtype, shape = np.dtype(specs[name][0]), tuple(int(d) for d in specs[name][1])
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            a = np.ascontiguousarray(produce(name), dtype=np.dtype(specs[name][0]))
            if a.shape != tuple(specs[name][1]):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {a.shape}, declared {specs[name][1]}")
            if a.size:
                f.write(a.reshape(-1).view(np.uint8).data)
            del a
