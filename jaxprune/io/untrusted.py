"""Reading files a user downloaded: JSON bounded in size and nesting, names confined to a directory.

A checkpoint is untrusted input. `read_json` / `parse_json` refuse a file larger than its kind
may be and measure the nesting of brackets before `json` parses anything (so a deeply nested
but valid document is a `CheckpointError`, never a `RecursionError`); `inside` resolves a file
name taken from a checkpoint (a shard of a sharded index) to a path that stays inside the
checkpoint directory, symlinks included; `short` keeps hostile values out of long messages.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "a.json"), "w") as f:
    ...     _ = f.write('{"x": [1, 2], "s": "[[[["}')
    >>> read_json(os.path.join(d, "a.json"), "config")["x"]
    [1, 2]
    >>> json_depth(b'{"x": [[1]], "s": "[[[["}')
    3
    >>> parse_json(b"[" * 100 + b"]" * 100, "h.json", "header")
    Traceback (most recent call last):
    ...
    jaxprune.errors.CheckpointError: h.json: header nests 100 levels deep (at most 64)
    >>> inside(d, "../a.json", "shard")
    Traceback (most recent call last):
    ...
    jaxprune.errors.CheckpointError: ...: shard '../a.json' is not a plain file name in the directory
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from jaxprune.errors import CheckpointError

MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_CHUNK = 1 << 22


def short(value, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters (hostile names and values can be megabytes long).

    >>> short("x" * 1000, 12)
    "'xxxxxxxxxx…"
    """
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 1] + "…"


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON text, outside strings, without parsing it
    (in chunks, so memory stays a small multiple of 4 MiB whatever the size)."""
    text = _STRING.sub(b'""', raw)
    depth = deepest = 0
    for start in range(0, len(text), _CHUNK):
        a = np.frombuffer(text, np.uint8, count=min(_CHUNK, len(text) - start), offset=start)
        step = ((a == 91) | (a == 123)).astype(np.int32) - ((a == 93) | (a == 125))
        if step.any():
            run = np.cumsum(step, dtype=np.int64) + depth
            deepest = max(deepest, int(run.max()))
            depth = int(run[-1])
    return deepest


def parse_json(raw: bytes, source: str, what: str, max_depth: int = MAX_DEPTH):
    """`json.loads(raw)` for untrusted bytes: nesting checked first; every failure a CheckpointError."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise CheckpointError(f"{source}: {what} nests {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, huge ints
        raise CheckpointError(f"{source}: corrupt {what} ({type(e).__name__}: {str(e)[:160]})") from None


def read_json(path: str, what: str, max_bytes: int = 64 << 20, max_depth: int = MAX_DEPTH):
    """The parsed JSON file `path` (at most `max_bytes`, nesting at most `max_depth`)."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise CheckpointError(f"{path}: {what} has {size} bytes (at most {max_bytes})")
        with open(path, "rb") as f:
            raw = f.read(min(size, max_bytes) + 1)   # read(n) allocates n bytes up front
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise CheckpointError(f"{path}: {what} has more than {max_bytes} bytes")
    return parse_json(raw, path, what, max_depth)


def read_json_dict(path: str, what: str, max_bytes: int = 64 << 20, max_depth: int = MAX_DEPTH) -> dict:
    """`read_json` that also requires a JSON object."""
    d = read_json(path, what, max_bytes, max_depth)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: corrupt {what} (a JSON {type(d).__name__}, not an object)")
    return d


def _roots(directory: str) -> list[str]:
    """Real directories a checkpoint's files may resolve into: the directory itself, and for a
    Hugging Face hub cache snapshot (``models--o--n/snapshots/REV``, whose files are symlinks
    into ``../../blobs``) that repository's ``blobs`` folder."""
    real = os.path.realpath(directory)
    roots = [real]
    snapshots, repo = os.path.dirname(real), os.path.dirname(os.path.dirname(real))
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(("models--", "datasets--")):
        roots.append(os.path.join(repo, "blobs"))
    return roots


def inside(directory: str, name, what: str = "file") -> str:
    """`directory/name` for a plain file name read from an untrusted file, only if it stays inside
    `directory` (no separators, no ``..``, no absolute path, and its real path, symlinks resolved,
    inside the directory); CheckpointError otherwise."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name) or (os.altsep and os.altsep in name)):
        raise CheckpointError(f"{directory}: {what} {short(name)} is not a plain file name in the directory")
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, root]) == root for root in _roots(directory)):
        raise CheckpointError(f"{directory}: {what} {short(name)} leads outside the directory (to {short(real)})")
    return path


__all__ = ["inside", "json_depth", "parse_json", "read_json", "read_json_dict", "short"]
