"""The files of a streamed run: reading one layer from a safetensors checkpoint, writing pruned
layers and masks atomically, and assembling the finished Hugging Face directory.

Used by `jaxprune.oneshot.streaming.prune_streaming`; every write goes to a temporary name and is
renamed into place, so a killed run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.params import Params
from jaxprune.io.hf import open_weights
from jaxprune.io.names import build_tree, flatten_tree, hf_to_path
from jaxprune.io.safetensors import read_tensor, tensor_locations, write_safetensors
from jaxprune.models.layout import layout_of


def layer_of(name: str, arch: str) -> int | None:
    path = hf_to_path(name, arch)
    return path[1] if path is not None and path[0] == "layers" else None


def tensor_index(source: str) -> dict[str, tuple[str, tuple]]:
    """HF name -> (file, location) for every tensor of a checkpoint directory."""
    index = os.path.join(source, "model.safetensors.index.json")
    if os.path.isfile(index):
        open_weights(source)   # validates the index and its shards
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fname in files:
        path = os.path.join(source, fname)
        out.update({name: (path, loc) for name, loc in tensor_locations(path).items()})
    return out


def read_layer(locations: dict, config, i: int) -> dict:
    """Layer i's params on the device, each tensor copied through a map of just its bytes."""
    mine = {k: v for k, v in locations.items() if layer_of(k, config.arch) == i}
    tree = build_tree(mine, config.arch, lambda loc, t: jax.device_put(read_tensor(loc[0], loc[1], transpose=t)))
    return tree["layers"][i]


def embedding_inputs(source: str, config, tokens: np.ndarray):
    """(params holding only what `models.embed` needs, tokens renumbered into it): only the
    embedding rows of tokens that occur are read from the map."""
    named = open_weights(source)
    ids, inverse = np.unique(tokens, return_inverse=True)
    small = {}
    for name, a in named.items():
        path = hf_to_path(name, config.arch)
        if path is None or path[0] in ("layers", "lm_head") or path[0].endswith("norm") \
                or path[:1] == ("project_out",):
            continue
        small[name] = np.asarray(a[ids]) if path[0] == "embed_tokens" else np.asarray(a)
    tree = build_tree(small, config.arch, lambda a, t: jnp.asarray(a.T if t else a))
    return Params(config, tree), inverse.reshape(tokens.shape).astype(np.int32)


class UnpackedMask:
    """A bit-packed bool mask that unpacks only when it is written."""
    dtype = np.dtype(np.bool_)

    def __init__(self, shape, bits):
        self.shape, self.bits = tuple(shape), bits

    def __array__(self, dtype=None, copy=None):
        a = np.unpackbits(self.bits, count=int(np.prod(self.shape))).astype(bool).reshape(self.shape)
        return a if dtype is None else a.astype(dtype)


def write_layer(tree: dict, i: int, arch: str, path: str, dtypes: dict | None = None) -> list[str]:
    """Write layer i's subtree as HF tensors (`[out, in]` kernels; `dtypes[name]` or bool -> uint8),
    converting one tensor at a time; atomic (temp then rename). Returns the names written."""
    leaves = flatten_tree({"layers": [{}] * i + [tree]}, arch)

    def dtype(name):
        leaf = leaves[name][1]
        return np.dtype(np.uint8) if np.dtype(leaf.dtype) == np.bool_ else np.dtype((dtypes or {}).get(name, leaf.dtype))

    def hf_shape(name):
        p, leaf = leaves[name]
        return tuple(leaf.shape)[::-1] if p[-1] == "kernel" else tuple(leaf.shape)

    def produce(name):
        p, leaf = leaves[name]
        a = np.asarray(leaf)
        return np.ascontiguousarray(a.T if p[-1] == "kernel" else a, dtype=dtype(name))   # one copy

    write_safetensors(path + ".tmp", {n: (dtype(n), hf_shape(n)) for n in leaves}, produce, {"format": "pt"})
    os.replace(path + ".tmp", path)
    return sorted(leaves)


def atomic_json(obj, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def write_rest(locations: dict, config, work: str, fname: str) -> list[str]:
    """Everything outside the decoder layers (embeddings, final norm, LM head), copied as stored,
    one tensor at a time."""
    rest = {k: v for k, v in locations.items()
            if hf_to_path(k, config.arch) is not None and layer_of(k, config.arch) is None}
    path = os.path.join(work, fname)
    write_safetensors(path + ".tmp", {k: (loc[0], loc[1]) for k, (_, loc) in rest.items()},
                      lambda k: read_tensor(*rest[k]), {"format": "pt"})
    os.replace(path + ".tmp", path)
    return sorted(rest)


def finish_directory(source: str, work: str, config, names: dict[str, str], mask_names: dict[str, str]):
    def index(weight_map, prefix):
        total = 0
        for f in set(weight_map.values()):
            total += os.path.getsize(os.path.join(work, f))
        atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                     os.path.join(work, f"{prefix}.safetensors.index.json"))
    index(names, "model")
    if mask_names:
        index(mask_names, "masks")
    for f in os.listdir(source):   # config, tokenizer and other small files travel along
        src = os.path.join(source, f)
        if os.path.isfile(src) and not f.endswith(".safetensors") and not f.endswith(".safetensors.index.json"):
            shutil.copy2(src, os.path.join(work, f))


def layer_statistics(locations: dict, config, i: int, packed: dict, chunk_bytes: int = 4 << 20) -> dict:
    """`report.layer_statistics`' row for layer i: its masks against the dense weights, read back
    from the source a few rows at a time (the pruned layer's buffers were donated)."""
    from jaxprune.report import layer_row, module_statistics
    mine = {k: v for k, v in locations.items() if layer_of(k, config.arch) == i}
    lazy = build_tree(mine, config.arch, lambda loc, t: (loc, t))["layers"][i]

    def chunks(fname, loc, transpose, keep):
        dtype, shape, offset = loc          # as stored: [out, in] for a kernel, whose mask is [in, out]
        keep = keep.T if transpose else keep
        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        step = max(1, chunk_bytes // max(1, row_bytes))
        for r in range(0, shape[0], step):
            k = min(step, shape[0] - r)
            mm = np.memmap(fname, dtype=dtype, mode="r", offset=offset + r * row_bytes, shape=(k,) + tuple(shape[1:]))
            yield np.array(mm, np.float32), keep[r:r + k]
            del mm

    modules, size, zeros = {}, 0, 0
    for path in sorted(packed):
        node = lazy
        for k in path:
            node = node[k]
        (fname, loc), transpose = node["kernel"]
        shape, bits = packed[path]
        keep = np.unpackbits(bits, count=int(np.prod(shape))).view(bool).reshape(shape)
        modules[".".join(path)], n, z = module_statistics(chunks(fname, loc, transpose, keep))
        size, zeros = size + n, zeros + z
    return layer_row(i, modules, size, zeros)


def linear_paths(config, lp: dict) -> list[tuple]:
    """Module paths + ('kernel',) of the linear layers present in one layer's params."""
    present = []
    for lin in layout_of(config).linears:
        node = lp
        for k in lin.path:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and "kernel" in node:
            present.append(lin.path + ("kernel",))
    return present
