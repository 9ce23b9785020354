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

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` string map of a safetensors header ({} when absent)."""
    return _read_raw_header(path)[0].get("__metadata__") or {}


def read_header(path: str) -> tuple[dict, int]:
    """(header dict without metadata, byte offset where tensor data begins)."""
    header, start = _read_raw_header(path)
    header.pop("__metadata__", None)
    return header, start


def _read_raw_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                                  f"(header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def open_safetensors(path: str) -> dict[str, np.ndarray]:
    """name -> read-only memory-mapped numpy array, validated against the file size."""
    header, start = read_header(path)
    data_len = os.path.getsize(path) - start
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len else None
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or missing field {e}") from None
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != need:
            raise CheckpointError(f"{path}: tensor {name!r} {info['dtype']}{list(shape)} needs {need} bytes "
                                  f"but the header gives {end - begin}")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data "
                                  f"section but only {data_len} bytes are present")
        out[name] = mm[begin:end].view(dtype).reshape(shape) if need else np.zeros(shape, dtype)
    return out


def tensor_locations(path: str) -> dict[str, tuple[np.dtype, tuple, int]]:
    """name -> (dtype, shape, absolute byte offset) of every tensor in a safetensors file (validated
    like `open_safetensors`), for reading one tensor at a time with `read_tensor`."""
    header, start = read_header(path)
    sizes = open_safetensors(path)   # validates offsets against the file; maps without reading
    return {name: (sizes[name].dtype, sizes[name].shape, start + int(header[name]["data_offsets"][0]))
            for name in header}


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
