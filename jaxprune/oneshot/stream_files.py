"""The files of a streamed run: reading one layer from a safetensors checkpoint, writing pruned
layers and masks atomically, the run's state (checksummed), and assembling the finished Hugging
Face directory.

Used by `jaxprune.oneshot.streaming.prune_streaming`; every write goes to a temporary name and is
renamed into place, so a killed run never leaves a half-written file under its final name (a
failed write removes its temporary file). `state.json` records the SHA-256 of every file a
finished layer wrote and one of its own content, so a resumed run rejects a corrupt state and
redoes a layer whose files were damaged; `claim` locks the work directory against a second
process.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "state.json")
    >>> state = {"fingerprint": "f", "done": 0, "names": {}, "masks": {}, "checksums": {}}
    >>> save_state(state, path)
    >>> check_state(load_state(path), path, ["layer0", "rest"], ["mask0"])["done"]
    0
    >>> changed = {**load_state(path), "done": 1}   # edited after it was written
    >>> check_state(changed, path, ["layer0", "rest"], ["mask0"])
    Traceback (most recent call last):
    ...
    jaxprune.errors.CheckpointError: ...: corrupt state of an unfinished run (its checksum does not match its content); ...
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.params import Params
from jaxprune.errors import CheckpointError
from jaxprune.io.hf import open_weights, read_index
from jaxprune.io.names import build_tree, flatten_tree, hf_to_path
from jaxprune.io.safetensors import read_tensor, tensor_locations, write_safetensors
from jaxprune.models.layout import layout_of


def layer_of(name: str, arch: str) -> int | None:
    path = hf_to_path(name, arch)
    return path[1] if path is not None and path[0] == "layers" else None


def tensor_index(source: str) -> dict[str, tuple[str, tuple]]:
    """HF name -> (file, location) for every tensor of a checkpoint directory."""
    if os.path.isfile(os.path.join(source, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        open_weights(source)   # validates the index (plain files inside `source`) and its shards
        files = sorted(set(read_index(source).values()))
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

    with _temporary(path) as tmp:
        write_safetensors(tmp, {n: (dtype(n), hf_shape(n)) for n in leaves}, produce, {"format": "pt"})
    return sorted(leaves)


class _temporary:
    """``with _temporary(path) as tmp:`` write `tmp`; renamed to `path` on success, removed on failure."""

    def __init__(self, path: str, suffix: str = ".tmp"):
        self.path, self.tmp = path, path + suffix

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, kind, *_):
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            try:
                os.remove(self.tmp)
            except OSError:
                pass
        return False


def atomic_json(obj, path: str):
    with _temporary(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)


def atomic_npy(array: np.ndarray, path: str):
    with _temporary(path, ".tmp.npy") as tmp:
        np.save(tmp, array)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks (None when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _content_sum(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_state(state: dict, path: str) -> None:
    """Write `state` atomically with the SHA-256 of its own content (`load_state` checks it)."""
    atomic_json({**state, "checksum": _content_sum(state)}, path)


def load_state(path: str) -> dict:
    """The JSON object in `path`, bounded in size and nesting (CheckpointError when it is not one);
    `check_state` then checks it is what `save_state` wrote."""
    from jaxprune.io.untrusted import read_json

    state = read_json(path, "state of an unfinished run", 256 << 20, 16)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt state of an unfinished run (not a JSON object)")
    return state


def check_state(state: dict, path: str, layer_files: list[str], mask_files: list[str]) -> dict:
    """`state` (same fingerprint) if its checksum and every field are right, else CheckpointError."""
    def bad(why):
        raise CheckpointError(f"{path}: corrupt state of an unfinished run ({why}); remove "
                              f"{os.path.dirname(path)} or pass overwrite=True to start over")

    if state.get("checksum") != _content_sum(state):
        bad("its checksum does not match its content")
    n = len(layer_files) - 1
    done, names, masks = state.get("done"), state.get("names"), state.get("masks")
    stats, sums = state.get("statistics", []), state.get("checksums")
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= n:
        bad(f"done={done!r} for {n} layers")
    if not (isinstance(names, dict) and all(isinstance(v, str) and v in layer_files for v in names.values())):
        bad("names must map tensors to the run's layer files")
    if not (isinstance(masks, dict) and all(isinstance(v, str) and v in mask_files for v in masks.values())):
        bad("masks must map tensors to the run's mask files")
    if not (isinstance(stats, list) and len(stats) == done):
        bad(f"statistics for {len(stats) if isinstance(stats, list) else '?'} layers, done={done}")
    allowed = set(layer_files) | set(mask_files) | {activations_file(i) for i in range(n + 1)}
    if not (isinstance(sums, dict) and all(k in allowed and isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v)
                                           for k, v in sums.items())):
        bad("checksums must map the run's files to SHA-256 digests")
    return state


def activations_file(i: int) -> str:
    """Name of the file holding the input activations of layer i (its own input for a redo)."""
    return f"activations-{i:05d}.npy"


def first_bad_layer(work: str, state: dict, layer_files: list[str], mask_files: list[str]) -> int:
    """The first layer to (re)do: `state["done"]` when every file a finished layer wrote has the
    checksum recorded in `state`, else the first layer whose layer or mask file differs (or the
    last finished one when its output activations differ); -1 when the non-layer file differs."""
    sums, done = state["checksums"], state["done"]
    ok = lambda f: f in sums and file_sha256(os.path.join(work, f)) == sums[f]
    if not ok(layer_files[-1]):
        return -1
    for i in range(done):
        if not (ok(layer_files[i]) and ok(mask_files[i])):
            return i
    if done and not ok(activations_file(done)):
        return done - 1
    return done


def claim(work: str) -> int:
    """Create (if needed) and lock the work directory for this process: a file descriptor to pass
    to `release`; CheckpointError when another process holds it."""
    import fcntl
    try:
        os.makedirs(work, exist_ok=True)
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CheckpointError(f"cannot write {work}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(work).st_ino:
            raise FileNotFoundError(work)
    except OSError:
        os.close(fd)
        raise CheckpointError(f"{work}: another process is writing this run; wait for it or remove it") from None
    return fd


def release(fd: int) -> None:
    os.close(fd)


def clear_directory(path: str) -> None:
    """Remove everything inside `path` (the directory itself stays: it is locked)."""
    for f in os.listdir(path):
        p = os.path.join(path, f)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


def write_rest(locations: dict, config, work: str, fname: str) -> list[str]:
    """Everything outside the decoder layers (embeddings, final norm, LM head), copied as stored,
    one tensor at a time."""
    rest = {k: v for k, v in locations.items()
            if hf_to_path(k, config.arch) is not None and layer_of(k, config.arch) is None}
    with _temporary(os.path.join(work, fname)) as tmp:
        write_safetensors(tmp, {k: (loc[0], loc[1]) for k, (_, loc) in rest.items()},
                          lambda k: read_tensor(*rest[k]), {"format": "pt"})
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
