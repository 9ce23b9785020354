"""A bounded walk over a GGUF file's header, before any GGUF reader trusts it.

`check_gguf(path)` reads the header itself — magic, version, tensor and key/value counts, every
key, every value (arrays, arrays of strings and nested arrays included), the tensor info table
(name, at most 4 dims, ggml type, offset) and the alignment — checking every count and length
against the bytes left in the file and against sane limits before it loops over or allocates
anything, then checks that each tensor's data lies inside the file, aligned and not overlapping
another, and that a ``*.block_count`` claims no more than 10000 layers (nor, in a file with
tensors, more layers than tensors). It costs one pass over the header (numbers inside arrays are
skipped, not read), so a few-dozen-byte file that claims a billion-element array is rejected in
microseconds; a vocabulary of 10^5 strings takes a few tens of milliseconds.

Format facts (little-endian GGUF v2/v3, as the `gguf` package and llama.cpp's ``gguf.cpp``
read it): ``GGUF`` magic, u32 version, u64 tensor count, u64 key/value count; a string is a u64
length and UTF-8 bytes; a value is a u32 type and its payload, an array a u32 element type, a
u64 count and the elements; a tensor info is a name, u32 n_dims, n_dims u64 dims, u32 ggml type
and a u64 offset relative to the data section, which starts at the next multiple of
``general.alignment`` (u32, a power of two; default 32) after the header.

Example:
    >>> import os, tempfile, numpy as np, gguf
    >>> path = os.path.join(tempfile.mkdtemp(), "t.gguf")
    >>> w = gguf.GGUFWriter(path, "llama")
    >>> w.add_block_count(1)
    >>> w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    >>> info = check_gguf(path)
    >>> info.version, info.n_tensors, info.tensors["token_embd.weight"]
    (3, 1, (0, (8, 4)))
    >>> with open(path, "r+b") as f:
    ...     _ = f.seek(16); _ = f.write((2**62).to_bytes(8, "little"))   # claim 2**62 keys
    >>> check_gguf(path)
    Traceback (most recent call last):
    ...
    jaxprune.errors.CheckpointError: ...: GGUF header claims 4611686018427387904 key/value pairs, but ...
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

from jaxprune.errors import CheckpointError
from jaxprune.io.untrusted import short

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                  # GGML_MAX_DIMS
MAX_NAME = 64                 # GGML_MAX_NAME: a tensor name is shorter
MAX_KEY = 1 << 16             # bytes of one key
MAX_STRING = 1 << 30          # bytes of one string value (llama.cpp's limit)
MAX_NESTING = 4               # arrays of arrays of ...
MAX_HEADER = 1 << 31          # bytes of the whole header (keys, values, tensor infos)
MAX_LAYERS = 10_000           # a `*.block_count` (as for config.json)

# value type -> payload size (None: string, "array": array)
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_UINT32 = 4
_INTEGER_TYPES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
# ggml type -> (block size in elements, bytes per block); gguf's GGML_QUANT_SIZES, read at first use
_GGML: dict[int, tuple[int, int]] = {}


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    if not _GGML:
        from gguf.constants import GGML_QUANT_SIZES
        _GGML.update({int(k): (int(b), int(t)) for k, (b, t) in GGML_QUANT_SIZES.items()})
    return _GGML


class GGUFInfo(NamedTuple):
    """What `check_gguf` found: sizes of the header's parts and each tensor's place."""
    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    data_offset: int                      # absolute byte offset of the data section
    tensors: dict[str, tuple[int, tuple]]  # name -> (ggml type, dims as stored: innermost first)


class _Cursor:
    """Reads little-endian fields from a mapped file, refusing to read past its end."""

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, message: str):
        raise CheckpointError(f"{self.path}: {message} (at byte {self.pos} of {self.size})")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            self.fail(f"truncated GGUF: {what} needs {n} bytes, {self.left()} are left")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def u32(self, what: str) -> int:
        self.need(4, what)
        self.pos += 4
        return _U32.unpack_from(self.buf, self.pos - 4)[0]

    def u64(self, what: str) -> int:
        self.need(8, what)
        self.pos += 8
        return _U64.unpack_from(self.buf, self.pos - 8)[0]

    def string(self, what: str, limit: int, keep: bool = True) -> str | None:
        n = self.u64(f"the length of {what}")
        if n > limit:
            self.fail(f"{what} claims {n} bytes (at most {limit})")
        if not keep:
            self.skip(n, what)
            return None
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8: {short(raw, 60)}")


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    """Skip (or, for scalars and strings, return) one value of type `vtype`."""
    if vtype in _SCALARS:
        raw = cur.take(_SCALARS[vtype], f"the value of {short(key)}")
        return struct.unpack(_INTEGER_TYPES[vtype], raw)[0] if vtype in _INTEGER_TYPES else None
    if vtype == _STRING:
        cur.string(f"the string value of {short(key)}", MAX_STRING, keep=False)
        return None
    if vtype == _ARRAY:
        if depth >= MAX_NESTING:
            cur.fail(f"{short(key)}: arrays nested more than {MAX_NESTING} deep")
        etype = cur.u32(f"the element type of {short(key)}")
        count = cur.u64(f"the length of {short(key)}")
        if etype in _SCALARS:
            cur.need(count * _SCALARS[etype], f"{short(key)}: an array of {count} elements")
            cur.skip(count * _SCALARS[etype], f"{short(key)}")
            return None
        smallest = {_STRING: 8, _ARRAY: 12}.get(etype)
        if smallest is None:
            cur.fail(f"{short(key)}: unknown array element type {etype}")
        if count * smallest > cur.left():
            cur.fail(f"{short(key)}: an array of {count} elements cannot fit in the {cur.left()} bytes left")
        if etype == _STRING:
            _skip_strings(cur, count, key)
        else:
            for _ in range(count):
                _value(cur, etype, key, depth + 1)
        return None
    cur.fail(f"{short(key)} has unknown value type {vtype}")


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    """Skip `count` strings (a vocabulary: often 10^5 of them), each length checked, in one tight loop."""
    buf, size, pos, unpack = cur.buf, cur.size, cur.pos, _U64.unpack_from
    for _ in range(count):
        if pos + 8 > size:
            cur.pos = pos
            cur.fail(f"truncated GGUF: a string of {short(key)} needs 8 bytes, {size - pos} are left")
        n = unpack(buf, pos)[0]
        pos += 8
        if n > MAX_STRING or n > size - pos:
            cur.pos = pos
            cur.fail(f"truncated GGUF: a string of {short(key)} claims {n} bytes, {size - pos} are left")
        pos += n
    cur.pos = pos


def check_gguf(path: str) -> GGUFInfo:
    """Walk a GGUF file's header with every count, length and offset bounded; CheckpointError on
    anything malformed (see the module docstring). Returns what it found (`GGUFInfo`)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                what = f"truncated GGUF ({size} bytes, no header)" if f.read(4) == MAGIC else "not a GGUF file"
                raise CheckpointError(f"{path}: {what}")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return _walk(_Cursor(buf, size, path))
    finally:
        buf.close()


def _walk(cur: _Cursor) -> GGUFInfo:
    path, size = cur.path, cur.size
    if cur.take(4, "the magic") != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
    version = cur.u32("the version")
    if version not in VERSIONS:
        cur.fail(f"unsupported GGUF version {version} (jaxprune reads {', '.join(map(str, VERSIONS))})")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the key/value count")
    # each key/value takes at least 8 + 1 + 4 + 1 bytes, each tensor info 8 + 4 + 4 + 8
    if n_kv * 14 > cur.left():
        cur.fail(f"GGUF header claims {n_kv} key/value pairs, but only {cur.left()} bytes are left")
    if n_tensors * 24 > cur.left():
        cur.fail(f"GGUF header claims {n_tensors} tensors, but only {cur.left()} bytes are left")
    alignment, seen = DEFAULT_ALIGNMENT, set()
    block_counts = []
    for i in range(n_kv):
        key = cur.string(f"key {i}", MAX_KEY)
        if not key:
            cur.fail(f"key {i} is empty")
        if key in seen:
            cur.fail(f"duplicate key {short(key)}")
        seen.add(key)
        vtype = cur.u32(f"the type of {short(key)}")
        value = _value(cur, vtype, key)
        if key == "general.alignment":
            if vtype != _UINT32 or not value or value & (value - 1):
                cur.fail(f"general.alignment must be a u32 power of two, got type {vtype} value {value}")
            alignment = value
        elif key.endswith(".block_count"):
            block_counts.append((key, vtype, value))
        if cur.pos > MAX_HEADER:
            cur.fail(f"GGUF header is larger than {MAX_HEADER} bytes")
    sizes = _ggml_sizes()
    tensors, spans = {}, []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}", MAX_NAME - 1)
        if name in tensors:
            cur.fail(f"duplicate tensor {short(name)}")
        n_dims = cur.u32(f"n_dims of {short(name)}")
        if n_dims > MAX_DIMS:
            cur.fail(f"tensor {short(name)} has {n_dims} dims (at most {MAX_DIMS})")
        dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"the dims of {short(name)}"))
        if any(d >= 2**63 for d in dims):
            cur.fail(f"tensor {short(name)} has a negative dimension {dims}")
        ggml = cur.u32(f"the type of {short(name)}")
        if ggml not in sizes:
            cur.fail(f"tensor {short(name)} has unknown ggml type {ggml}")
        offset = cur.u64(f"the offset of {short(name)}")
        block, bytes_per_block = sizes[ggml]
        count = 1
        for d in dims:
            count *= d
        if dims and dims[0] % block:
            cur.fail(f"tensor {short(name)}: rows of {dims[0]} elements are not whole blocks of {block}")
        nbytes = count // block * bytes_per_block
        tensors[name] = (ggml, dims)
        spans.append((offset, nbytes, name))
    for key, vtype, value in block_counts:   # a vocabulary-only file has no tensors but a block count
        if vtype not in _INTEGER_TYPES or value is None or value > MAX_LAYERS or (n_tensors and value > n_tensors):
            cur.fail(f"{short(key)} is {value} (type {vtype}): more than {MAX_LAYERS} layers or than the "
                     f"{n_tensors} tensors could hold")
    data_offset = cur.pos + (-cur.pos % alignment) if n_tensors else cur.pos
    data_len = size - data_offset
    if n_tensors and data_len < 0:
        cur.fail("truncated GGUF: the data section starts after the end of the file")
    spans.sort()
    end_prev, prev = 0, None
    for offset, nbytes, name in spans:
        if offset % alignment:
            cur.fail(f"tensor {short(name)}: offset {offset} is not a multiple of the alignment {alignment}")
        if offset + nbytes > data_len:
            cur.fail(f"truncated GGUF: tensor {short(name)} needs bytes {offset}..{offset + nbytes} of the data "
                     f"section, which has {data_len}")
        if nbytes and offset < end_prev:
            cur.fail(f"tensors {short(prev)} and {short(name)} overlap in the data section")
        if nbytes:
            end_prev, prev = offset + nbytes, name
    return GGUFInfo(version, n_tensors, n_kv, alignment, data_offset, tensors)


__all__ = ["GGUFInfo", "check_gguf"]
