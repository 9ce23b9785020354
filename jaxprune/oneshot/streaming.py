"""Layer streaming: prune a checkpoint larger than memory, one layer at a time, resumably.

`prune_streaming` reads one decoder layer at a time from a Hugging Face safetensors
checkpoint (memory-mapped; each layer's mapping is dropped once it is copied), runs
Wanda or SparseGPT's sequential calibration on it (`calibration.LayerPruner`, the same
jitted passes as the in-memory methods), and writes the pruned layer and its masks
out before the next layer is read. Peak host memory is about one layer (plus its
pruned copy, whose buffers reuse the old ones where XLA can) plus the calibration
activations: never the whole model.

Work happens in ``OUT.partial/``. After each layer the layer file, the next layer's
input activations and ``state.json`` (the commit point) are written atomically, so a
run killed at any moment resumes from the last finished layer, with the same settings,
and produces the same files as an uninterrupted run. The finished directory is
renamed to ``OUT``: a Hugging Face checkpoint (``model-XXXXX-of-YYYYY.safetensors`` +
index, the source's dtype) with ``masks*.safetensors`` beside it (uint8, 1 = keep,
``[out, in]``), loadable with `jaxprune.load` and `load_masks`.

Example:
    >>> import jax, numpy as np, tempfile, os, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> src = jp.save(jp.init(cfg, jax.random.key(0)), os.path.join(tempfile.mkdtemp(), "dense"))
    >>> calib = np.random.default_rng(0).integers(0, 64, (4, 16))
    >>> out = prune_streaming(src, src + "-wanda", calib, "wanda", sparsity=0.5, show_progress=False)
    >>> masks = load_masks(out)
    >>> float(np.mean(masks["layers"][1]["mlp"]["up_proj"]["kernel"]))
    0.5
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import models
from jaxprune.calibration.driver import LayerPruner, embed_chunks
from jaxprune.io.export import load_masks  # noqa: F401  (re-exported: masks beside a streamed output)
from jaxprune.core.checks import check_tokens
from jaxprune.errors import CheckpointError, InvalidArgumentError
from jaxprune.io.hf import open_weights, read_config
from jaxprune.io.names import build_tree, flatten_tree, hf_to_path
from jaxprune.io.safetensors import read_tensor, tensor_locations, write_safetensors
from jaxprune.sparsity.masks import check_sparsity, parse_pattern
from jaxprune.core.params import Params
from jaxprune.models.layout import layout_of
from jaxprune.core.progress import progress

METHODS = ("wanda", "sparsegpt")
LOW_MEMORY_LAYER_BYTES = 64 * 2**20


def _layer_of(name: str, arch: str) -> int | None:
    path = hf_to_path(name, arch)
    return path[1] if path is not None and path[0] == "layers" else None


def return_freed_memory() -> None:
    """Ask glibc to give large freed blocks back to the OS at once (a fixed mmap threshold of 1 MiB
    and no trim threshold), so the peak resident size follows what is live, not what was ever
    allocated.

    Process-wide and never undone, so jaxprune never calls it for you: call it once before
    `prune_streaming` when peak memory matters more than allocation speed (``jaxprune prune
    --stream`` does). A no-op where glibc is absent."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)         # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _locations(source: str) -> dict[str, tuple[str, tuple]]:
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


def _read_layer(locations: dict, config, i: int) -> dict:
    """Layer i's params on the device, each tensor copied through a map of just its bytes."""
    mine = {k: v for k, v in locations.items() if _layer_of(k, config.arch) == i}
    tree = build_tree(mine, config.arch, lambda loc, t: jax.device_put(read_tensor(loc[0], loc[1], transpose=t)))
    return tree["layers"][i]


def _embedding_inputs(source: str, config, tokens: np.ndarray):
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


class _Unpacked:
    """A bit-packed bool mask that unpacks only when it is written."""
    dtype = np.dtype(np.bool_)

    def __init__(self, shape, bits):
        self.shape, self.bits = tuple(shape), bits

    def __array__(self, dtype=None, copy=None):
        a = np.unpackbits(self.bits, count=int(np.prod(self.shape))).astype(bool).reshape(self.shape)
        return a if dtype is None else a.astype(dtype)


def _write_layer(tree: dict, i: int, arch: str, path: str, dtypes: dict | None = None) -> list[str]:
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


def _atomic_json(obj, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _fingerprint(source, tokens, settings) -> str:
    h = hashlib.sha256(json.dumps({"source": os.path.abspath(source), **settings}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(tokens).tobytes())
    h.update(str(tokens.shape).encode())
    return h.hexdigest()


def _validate(config, tokens, method, sparsity, pattern, blocksize):
    if method not in METHODS:
        raise InvalidArgumentError(f"streaming prunes with one of {METHODS}, got {method!r}")
    sparsity = check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    if nm and method == "sparsegpt" and blocksize % nm[1]:
        raise InvalidArgumentError(f"blocksize={blocksize} must be a multiple of M={nm[1]}")
    return sparsity, nm, check_tokens(config, tokens)


def _prune_dense(method, nm, blocksize, percdamp):
    from jaxprune.oneshot.pruning import _sparsegpt_dense, _wanda_dense
    if method == "wanda":
        return "sumsq", _wanda_dense(nm, "row")
    return "hessian", _sparsegpt_dense(nm, blocksize, percdamp)


def _write_rest(locations: dict, config, work: str, fname: str) -> list[str]:
    """Everything outside the decoder layers (embeddings, final norm, LM head), copied as stored,
    one tensor at a time."""
    rest = {k: v for k, v in locations.items()
            if hf_to_path(k, config.arch) is not None and _layer_of(k, config.arch) is None}
    path = os.path.join(work, fname)
    write_safetensors(path + ".tmp", {k: (loc[0], loc[1]) for k, (_, loc) in rest.items()},
                      lambda k: read_tensor(*rest[k]), {"format": "pt"})
    os.replace(path + ".tmp", path)
    return sorted(rest)


def _finish(source: str, work: str, config, names: dict[str, str], mask_names: dict[str, str]):
    def index(weight_map, prefix):
        total = 0
        for f in set(weight_map.values()):
            total += os.path.getsize(os.path.join(work, f))
        _atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                     os.path.join(work, f"{prefix}.safetensors.index.json"))
    index(names, "model")
    if mask_names:
        index(mask_names, "masks")
    for f in os.listdir(source):   # config, tokenizer and other small files travel along
        src = os.path.join(source, f)
        if os.path.isfile(src) and not f.endswith(".safetensors") and not f.endswith(".safetensors.index.json"):
            shutil.copy2(src, os.path.join(work, f))


def prune_streaming(source: str, out: str, calib, method: str = "wanda", sparsity: float = 0.5,
                    pattern=None, *, mode: str = "sequential", batch_size: int = 8, blocksize: int = 128,
                    percdamp: float = 0.01, compute_dtype=jnp.float32, overwrite: bool = False,
                    low_memory: bool | None = None, show_progress=None,
                    on_layer: Callable[[int], None] | None = None, statistics: list | None = None) -> str:
    """Prune the checkpoint directory `source` into `out`, one layer in memory at a time.

    Args:
      source: a Hugging Face Llama/OPT checkpoint directory (safetensors, any dtype).
      out: the directory to write; it must not exist unless `overwrite`.
      calib: int calibration tokens [n, seqlen].
      method: 'wanda' (row-wise) or 'sparsegpt'; `sparsity`, `pattern` ('2:4'...), `mode`
        ('sequential', 'as-you-go', 'dense'), `blocksize` and `percdamp` as for `jaxprune.wanda`
        and `jaxprune.sparsity.sparsegpt`.
      batch_size: calibration windows per forward.
      compute_dtype: dtype of the activations (weights stay in the stored dtype on the device).
      low_memory: run each layer's passes op by op with column-blocked matmuls, so no weight is
        ever held twice (`calibration.LayerPruner(jit_passes=False)`); default: for layers above
        `LOW_MEMORY_LAYER_BYTES` (64 MiB). Smaller layers use the faster whole-layer jitted passes.
      on_layer: called with the layer index after each layer is committed.
      statistics: a list that receives `jaxprune.report.layer_statistics`' rows (per layer:
        sparsity and weight norm removed per module), kept across a resume.

    Returns:
      `out`. A run interrupted for any reason resumes from ``out + ".partial"`` when called
      again with the same arguments.
    """
    config = read_config(source)
    sparsity, nm, tokens = _validate(config, calib, method, sparsity, pattern, blocksize)
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    settings = dict(method=method, sparsity=sparsity, pattern=nm, mode=mode, batch_size=batch_size,
                    blocksize=blocksize, percdamp=percdamp, compute_dtype=np.dtype(compute_dtype).name)
    fingerprint = _fingerprint(source, tokens, settings)
    work = out + ".partial"
    state_path = os.path.join(work, "state.json")
    L = config.num_hidden_layers
    files = [f"model-{k + 1:05d}-of-{L + 1:05d}.safetensors" for k in range(L + 1)]
    state = None
    if os.path.isfile(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state.get("fingerprint") != fingerprint:
            if not overwrite:
                raise CheckpointError(f"{work} holds an unfinished run with other settings or data; remove it "
                                      f"or pass overwrite=True to start over")
            state = None
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        try:
            os.makedirs(work)
        except OSError as e:
            raise CheckpointError(f"cannot write {work}: {e.strerror}") from None
        rest = _write_rest(_locations(source), config, work, files[L])
        state = {"fingerprint": fingerprint, "done": 0, "names": {n: files[L] for n in rest}, "masks": {}}

    kind, prune_dense = _prune_dense(method, nm, blocksize, percdamp)
    if low_memory is None:
        stored_itemsize = max(np.dtype(loc[0]).itemsize for _, loc in _locations(source).values())
        low_memory = layer_bytes(config, np.dtype(f"u{stored_itemsize}")) > LOW_MEMORY_LAYER_BYTES
    pruner = LayerPruner(config, kind, prune_dense, mode, donate=True, jit_passes=not low_memory)
    small, local_tokens = _embedding_inputs(source, config, tokens)
    X, ctx = embed_chunks(small, jnp.asarray(local_tokens), batch_size)
    del small
    sizes = [x.shape[0] for x in X]
    acts = os.path.join(work, "activations.npy")
    if state["done"]:
        saved = np.load(acts)
        X = [jnp.asarray(a) for a in np.split(saved, np.cumsum(sizes)[:-1])]
        del saved
    else:
        X = [x.astype(compute_dtype) for x in X]
    count = jnp.asarray(float(tokens.size), jnp.float32)
    locations = _locations(source)
    stored = {k: loc[0] for k, (_, loc) in locations.items()}

    for i in progress(range(state["done"], L), f"{method} (streaming)", total=L - state["done"],
                      enabled=show_progress):
        lp = _read_layer(locations, config, i)
        target = frozenset(p[:-1] for p in _linear_paths(config, lp))
        packed = {}   # each mask bit-packed on the host as soon as it exists: 1/8 of a byte per weight

        def take_mask(path, keep):
            packed[path] = (keep.shape, np.packbits(np.asarray(keep)))

        new_lp, masks, X = pruner.step(lp, X, ctx, models.kv_groups(config, i), sparsity, target, count,
                                       take_mask=take_mask, layer_type=models.layer_type(config, i))
        for path, keep in masks.items():   # as-you-go mode returns them at the end
            take_mask(path, keep)
        del masks
        del lp
        names = _write_layer(new_lp, i, config.arch, os.path.join(work, files[i]), stored)
        state["names"].update({n: files[i] for n in names})
        del new_lp
        state.setdefault("statistics", []).append(_layer_statistics(locations, config, i, packed))
        mtree = {}
        for path, (shape, bits) in packed.items():
            node = mtree
            for p in path:
                node = node.setdefault(p, {})
            node["kernel"] = _Unpacked(shape, bits)
        mfile = f"masks-{i + 1:05d}-of-{L:05d}.safetensors"
        names = _write_layer(mtree, i, config.arch, os.path.join(work, mfile))
        state["masks"].update({n: mfile for n in names})
        del mtree
        packed.clear()
        np.save(acts + ".tmp.npy", np.concatenate([np.asarray(x) for x in X]))
        os.replace(acts + ".tmp.npy", acts)
        state["done"] = i + 1
        _atomic_json(state, state_path)
        gc.collect()   # the traced layer's reference cycles would otherwise keep its buffers alive
        if on_layer is not None:
            on_layer(i)

    _finish(source, work, config, state["names"], state["masks"])
    if statistics is not None:
        statistics.extend(state.get("statistics", []))
    for f in ("state.json", "activations.npy"):
        os.remove(os.path.join(work, f))
    if os.path.exists(out):
        old = out + ".old"
        os.rename(out, old)
        os.rename(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(work, out)
    return out


def _layer_statistics(locations: dict, config, i: int, packed: dict, chunk_bytes: int = 4 << 20) -> dict:
    """`report.layer_statistics`' row for layer i: its masks against the dense weights, read back
    from the source a few rows at a time (the pruned layer's buffers were donated)."""
    from jaxprune.report import layer_row, module_statistics
    mine = {k: v for k, v in locations.items() if _layer_of(k, config.arch) == i}
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


def _linear_paths(config, lp: dict) -> list[tuple]:
    """Module paths + ('kernel',) of the linear layers present in one layer's params."""
    present = []
    for lin in layout_of(config).linears:
        node = lp
        for k in lin.path:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and "kernel" in node:
            present.append(lin.path + ("kernel",))
    return present


def write_random_checkpoint(path: str, config, dtype=np.float32, seed: int = 0) -> str:
    """Write a Hugging Face directory of random weights for `config`, one layer per file, holding
    at most one tensor in memory (for streaming tests and benchmarks of models larger than memory).
    Weights ~ N(0, 0.02), norm scales 1."""
    from safetensors.numpy import save_file
    from jaxprune.io.names import path_to_hf
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=False)
    shapes = models.shapes(config)
    groups = [{"layers": [{}] * i + [lp]} for i, lp in enumerate(shapes["layers"])]
    groups.append({k: v for k, v in shapes.items() if k != "layers"})
    weight_map = {}
    for g, tree in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        arrays = {}
        for kp, shape in jax.tree_util.tree_flatten_with_path(tree, is_leaf=models.is_shape)[0]:
            p = tuple(k.key if hasattr(k, "key") else k.idx for k in kp)
            hf_shape = shape[::-1] if p[-1] == "kernel" else shape
            a = np.ones(hf_shape, dtype) if p[-1] == "scale" else \
                (0.02 * rng.standard_normal(hf_shape, np.float32)).astype(dtype)
            arrays[path_to_hf(p, config.arch)] = a
        save_file(arrays, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in arrays})
        del arrays
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config.to_hf(), "torch_dtype": dtype.name}, f,
                  indent=2, sort_keys=True)
    return path


def layer_bytes(config, dtype) -> int:
    """Bytes of one decoder layer's weights in `dtype` (layer 0's shapes)."""
    return sum(int(np.prod(s)) for s in jax.tree.leaves(models.shapes(config)["layers"][0], is_leaf=models.is_shape)) \
        * np.dtype(dtype).itemsize


__all__ = ["layer_bytes", "load_masks", "prune_streaming", "write_random_checkpoint"]
