"""Compressed storage of sparse models: N:M weights packed, unstructured masks bit-packed.

`save_compressed(params, path, masks=None)` writes a directory with the model's
`config.json` and one `sparse.safetensors` holding, per tensor (HF names and
`[out, in]` layout, so N:M groups of M run contiguously along the input axis):

- **N:M** (every group of M inputs keeps exactly N): `NAME.values` [out, in*N/M],
  the kept weights in order, and `NAME.nm_index`, each kept weight's position in
  its group (0..M-1) in ceil(log2 M) bits, bit-packed (uint8). 2:4 costs
  2 bits of index per kept weight, as in NVIDIA's sparse tensor core format.
- **unstructured**: `NAME.values` [nnz], the kept weights in row-major order, and
  `NAME.mask_bits`, the mask bit-packed (one bit per weight, `np.packbits`).
- **dense**: `NAME` as is (embeddings, norms, biases, unpruned weights).

A tensor is packed only when that is smaller than dense. The safetensors
metadata names each tensor's format and shape; `compression.json` reports
bytes on disk next to the dense size. `load_compressed` restores params and
masks exactly (weights under a False mask are zero, as after
`jp.apply_masks`); `jp.load` reads such a directory too.

Example:
    >>> import jax, tempfile, os, numpy as np, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> masks = jp.magnitude(params, 0.5, pattern="2:4")
    >>> pruned = jp.apply_masks(params, masks)
    >>> info = jp.save_compressed(pruned, os.path.join(tempfile.mkdtemp(), "c"), masks=masks)
    >>> sorted(set(info["formats"].values()))
    ['dense', 'nm']
    >>> back, back_masks = jp.load_compressed(info["path"])
    >>> all(bool(np.array_equal(a, b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(pruned)))
    True
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from jaxprune.errors import CheckpointError, InvalidArgumentError
from jaxprune.sparsity.masks import check_masks_like
from jaxprune.core.params import Params
from jaxprune.io.names import flatten_tree, hf_to_path
from jaxprune.io.safetensors import open_safetensors, read_metadata, write_safetensors
from jaxprune.io.untrusted import inside, parse_json, short

FILE = "sparse.safetensors"
REPORT = "compression.json"
FORMAT_KEY = "jaxprune_compressed"
CANDIDATE_M = (4, 8, 16)


# --------------------------------------------------------------------------- bit packing


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers < 2**bits into a uint8 stream, `bits` bits each (little-endian bits).

    >>> pack_bits(np.array([0, 1, 2, 3]), 2).tolist(), unpack_bits(pack_bits(np.array([0, 1, 2, 3]), 2), 2, 4).tolist()
    ([228], [0, 1, 2, 3])
    """
    v = np.asarray(values, np.uint8).reshape(-1)
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` integers of `bits` bits each (uint8)."""
    planes = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits, bitorder="little")
    return (planes.reshape(count, bits) << np.arange(bits, dtype=np.uint8)).sum(1).astype(np.uint8)


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


# --------------------------------------------------------------------------- per-tensor encoding


def nm_of(mask: np.ndarray) -> tuple[int, int] | None:
    """(N, M) if every group of M along the last axis keeps exactly N < M (smallest such M), else None."""
    if mask.ndim != 2:
        return None
    for m in CANDIDATE_M:
        if mask.shape[1] % m:
            continue
        counts = mask.reshape(mask.shape[0], -1, m).sum(-1)
        n = int(counts.flat[0]) if counts.size else 0
        if 0 < n < m and (counts == n).all():
            return n, m
    return None


def encode(name: str, w: np.ndarray, keep: np.ndarray | None) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and metadata storing one HF-layout tensor `w` under mask `keep` (None: dense)."""
    dense = ({name: w}, {"format": "dense"})
    if keep is None or keep.all():
        return dense
    info = {"shape": list(w.shape), "dtype": str(w.dtype)}
    nm = nm_of(keep)
    if nm is not None:
        n, m = nm
        out_, in_ = w.shape
        k3 = keep.reshape(out_, in_ // m, m)
        pos = np.argsort(~k3, axis=-1, kind="stable")[..., :n]              # kept positions, ascending
        values = np.take_along_axis(w.reshape(out_, in_ // m, m), pos, -1).reshape(out_, -1)
        arrays = {f"{name}.values": values, f"{name}.nm_index": pack_bits(pos, index_bits(m))}
        info.update(format="nm", n=n, m=m)
    else:
        arrays = {f"{name}.values": w[keep], f"{name}.mask_bits": np.packbits(keep.reshape(-1))}
        info.update(format="bitmask")
    if sum(a.nbytes for a in arrays.values()) >= w.nbytes:
        return dense
    return arrays, info


def decode(name: str, arrays: dict[str, np.ndarray], info: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight, mask or None) of one tensor from its stored arrays (inverse of `encode`). Every size
    is checked against the stored arrays first (CheckpointError), so a corrupt file never makes it
    allocate more than the N:M or bit-packed data it holds could expand to."""
    def bad(why):
        raise CheckpointError(f"tensor {short(name)}: corrupt compressed entry ({why})")

    if not isinstance(info, dict):
        bad(f"a JSON {type(info).__name__}")
    fmt = info.get("format")
    if fmt == "dense":
        return np.asarray(arrays[name]), None
    if fmt not in ("nm", "bitmask"):
        raise CheckpointError(f"{short(name)}: unknown compressed format {short(fmt, 40)}")
    shape = info.get("shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 2 and all(_count(d) for d in shape)):
        bad(f"shape {short(shape, 40)}")
    shape = tuple(shape)
    values = np.asarray(arrays[f"{name}.values"])
    if str(values.dtype) != info.get("dtype", str(values.dtype)):
        bad(f"values are {values.dtype}, the entry says {short(info.get('dtype'), 20)}")
    size = int(np.prod(shape, dtype=object))
    if fmt == "nm":
        n, m = info.get("n"), info.get("m")
        if len(shape) != 2 or m not in CANDIDATE_M or not _count(n) or not 0 < n < m or shape[1] % m:
            bad(f"{short(n, 20)}:{short(m, 20)} pattern for shape {shape}")
        out_, in_ = shape
        kept = out_ * (in_ // m) * n
        index = np.asarray(arrays[f"{name}.nm_index"])
        if values.size != kept or index.dtype != np.uint8 or index.size * 8 < kept * index_bits(m):
            bad(f"{values.size} values and {index.size} index bytes for {kept} kept weights")
        pos = unpack_bits(index, index_bits(m), kept).reshape(out_, in_ // m, n).astype(np.int64)
        if pos.size and (pos.max() >= m or (n > 1 and np.any(np.diff(pos, axis=-1) <= 0))):
            bad("kept positions out of order or out of range")
        w = np.zeros((out_, in_ // m, m), values.dtype)
        np.put_along_axis(w, pos, values.reshape(out_, in_ // m, n), -1)
        keep = np.zeros((out_, in_ // m, m), bool)
        np.put_along_axis(keep, pos, True, -1)
        return w.reshape(shape), keep.reshape(shape)
    bits = np.asarray(arrays[f"{name}.mask_bits"])
    if bits.dtype != np.uint8 or bits.size * 8 < size or values.ndim != 1:
        bad(f"{bits.size} mask bytes for {size} weights")
    keep = np.unpackbits(bits, count=size).astype(bool).reshape(shape)
    if int(keep.sum()) != values.size:
        bad(f"{values.size} values for {int(keep.sum())} kept weights")
    w = np.zeros(shape, values.dtype)
    w[keep] = values
    return w, keep


def _count(x) -> bool:
    """Whether `x` is a JSON integer >= 0 (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**40


# --------------------------------------------------------------------------- directories


def _hf_named(tree: Params) -> dict[str, tuple[tuple, np.ndarray]]:
    """name -> (tree path, array in HF layout: kernels transposed to [out, in])."""
    return {name: (path, np.asarray(leaf).T if path[-1] == "kernel" else np.asarray(leaf))
            for name, (path, leaf) in flatten_tree(tree.tree, tree.config.arch).items()}


def _masks_by_name(params: Params, masks) -> dict[str, np.ndarray]:
    """HF-layout bool masks by tensor name: the given masks, or `weight != 0` for layer kernels."""
    if masks is None:
        return {name: (w != 0) for name, (path, w) in _hf_named(params).items()
                if path[0] == "layers" and path[-1] == "kernel"}
    check_masks_like(params, masks)
    out = {}
    for name, (path, m) in _hf_named(masks).items():
        out[name] = np.asarray(m).astype(bool)
    return out


def save_compressed(params: Params, path: str, masks: Params | None = None, overwrite: bool = False,
                    tokenizer=None) -> dict:
    """Write `params` with sparse weights packed; returns the size report (also in compression.json).

    Args:
      params: pruned params (weights under a False mask must already be zero: `jp.apply_masks`).
      path: output directory (written atomically; an existing one only with `overwrite`).
      masks: masks shaped like params; None derives them as `weight != 0` for the layers' kernels.
      tokenizer: optionally saved beside the weights (`tokenizer.json`).

    Returns:
      {"path", "bytes_on_disk", "dense_bytes", "ratio", "formats": {name: "dense"|"nm"|"bitmask"}}.
    """
    from jaxprune.io.export import write_directory

    if not isinstance(params, Params):
        raise InvalidArgumentError(f"save_compressed needs jaxprune Params, got {type(params).__name__}")
    keep = _masks_by_name(params, masks)
    arrays, infos, dense_bytes = {}, {}, 0
    for name, (_, w) in _hf_named(params).items():
        k = keep.get(name)
        if k is not None:
            if k.shape != w.shape:
                raise InvalidArgumentError(f"mask {name} has shape {k.shape}, the weight {w.shape}")
            if np.any(w[~k] != 0):
                raise InvalidArgumentError(f"{name} has non-zero weights where its mask is False; "
                                           "apply the masks first (jp.apply_masks(params, masks))")
        a, info = encode(name, np.ascontiguousarray(w), k)
        arrays.update(a)
        infos[name] = info
        dense_bytes += w.nbytes

    def write(tmp: str) -> None:
        specs = {n: (a.dtype, a.shape) for n, a in arrays.items()}
        write_safetensors(os.path.join(tmp, FILE), specs, arrays.__getitem__,
                          metadata={FORMAT_KEY: json.dumps(infos, sort_keys=True)})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(params.config.to_hf(), f, indent=2, sort_keys=True)
        if tokenizer is not None:
            try:
                tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
            except Exception as e:   # tokenizers raises its own exception types, e.g. on a full disk
                raise OSError(f"writing tokenizer.json failed ({e})") from None
        stored = os.path.getsize(os.path.join(tmp, FILE))
        report = {"bytes_on_disk": stored, "dense_bytes": dense_bytes, "ratio": stored / max(dense_bytes, 1),
                  "formats": {n: i["format"] for n, i in infos.items()}}
        with open(os.path.join(tmp, REPORT), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)

    out = write_directory(path, write, overwrite)
    with open(os.path.join(out, REPORT)) as f:
        return {"path": out, **json.load(f)}


def is_compressed(path: str) -> bool:
    """Whether `path` is a directory written by `save_compressed`."""
    return os.path.isfile(os.path.join(path, FILE))


def load_compressed(path: str, dtype=None) -> tuple[Params, Params]:
    """(params, masks) from a `save_compressed` directory; masks are True where nothing was pruned.

    `dtype` casts the weights (default: keep the stored dtype, so the round trip is exact).
    """
    from jaxprune.io.hf import from_named_arrays, read_config

    config = read_config(path)
    file = os.path.join(path, FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no {FILE}; not a compressed jaxprune checkpoint")
    file = inside(path, FILE)
    arrays = open_safetensors(file)
    infos = parse_json(read_metadata(file).get(FORMAT_KEY, "null").encode(), file, f"'{FORMAT_KEY}' metadata", 8)
    if not isinstance(infos, dict):
        raise CheckpointError(f"{file}: no '{FORMAT_KEY}' metadata; not written by save_compressed")
    weights, keeps = {}, {}
    for name, info in infos.items():
        try:
            weights[name], keep = decode(name, arrays, info)
        except KeyError as e:
            raise CheckpointError(f"{file}: tensor {short(e.args[0])} of {short(name)} is missing") from None
        except CheckpointError as e:
            raise CheckpointError(f"{file}: {e}") from None
        if keep is not None:
            keeps[name] = keep
    params = from_named_arrays(config, weights, source=path, dtype=dtype)
    mask_tree = jax.tree.map(lambda w: np.ones(np.shape(w), bool), params.tree)
    for name, keep in keeps.items():
        p = hf_to_path(name, config.arch)
        node = mask_tree
        try:
            for k in p[:-1]:
                node = node[k]
            leaf = node[p[-1]]
        except (TypeError, KeyError, IndexError):
            raise CheckpointError(f"{file}: mask of {short(name)} names no weight of the model") from None
        keep = keep.T if p[-1] == "kernel" else keep
        if keep.shape != np.shape(leaf):
            raise CheckpointError(f"{file}: mask of {short(name)} has shape {keep.shape}, the weight {np.shape(leaf)}")
        node[p[-1]] = keep
    return params, Params(config, mask_tree)


__all__ = ["load_compressed", "save_compressed", "is_compressed", "pack_bits", "unpack_bits"]
