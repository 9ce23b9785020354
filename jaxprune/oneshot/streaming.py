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

import jax.numpy as jnp
import numpy as np

from jaxprune import models
from jaxprune.calibration.driver import LayerPruner, embed_chunks
from jaxprune.io.export import load_masks  # noqa: F401  (re-exported: masks beside a streamed output)
from jaxprune.core.checks import check_tokens
from jaxprune.errors import CheckpointError, InvalidArgumentError
from jaxprune.io.hf import read_config
from jaxprune.sparsity.masks import check_sparsity, parse_pattern
from jaxprune.core.progress import progress
from jaxprune.core.memory import return_freed_memory  # noqa: F401  (re-exported)
from jaxprune.io.synthetic import layer_bytes, write_random_checkpoint  # noqa: F401  (re-exported)
from jaxprune.oneshot.stream_files import (UnpackedMask, atomic_json, embedding_inputs, finish_directory, layer_statistics,
                                          linear_paths, read_layer, tensor_index, write_layer, write_rest)

METHODS = ("wanda", "sparsegpt")
LOW_MEMORY_LAYER_BYTES = 64 * 2**20


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
        rest = write_rest(tensor_index(source), config, work, files[L])
        state = {"fingerprint": fingerprint, "done": 0, "names": {n: files[L] for n in rest}, "masks": {}}

    kind, prune_dense = _prune_dense(method, nm, blocksize, percdamp)
    if low_memory is None:
        stored_itemsize = max(np.dtype(loc[0]).itemsize for _, loc in tensor_index(source).values())
        low_memory = layer_bytes(config, np.dtype(f"u{stored_itemsize}")) > LOW_MEMORY_LAYER_BYTES
    pruner = LayerPruner(config, kind, prune_dense, mode, donate=True, jit_passes=not low_memory)
    small, local_tokens = embedding_inputs(source, config, tokens)
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
    locations = tensor_index(source)
    stored = {k: loc[0] for k, (_, loc) in locations.items()}

    for i in progress(range(state["done"], L), f"{method} (streaming)", total=L - state["done"],
                      enabled=show_progress):
        lp = read_layer(locations, config, i)
        target = frozenset(p[:-1] for p in linear_paths(config, lp))
        packed = {}   # each mask bit-packed on the host as soon as it exists: 1/8 of a byte per weight

        def take_mask(path, keep):
            packed[path] = (keep.shape, np.packbits(np.asarray(keep)))

        new_lp, masks, X = pruner.step(lp, X, ctx, models.kv_groups(config, i), sparsity, target, count,
                                       take_mask=take_mask, layer_type=models.layer_type(config, i))
        for path, keep in masks.items():   # as-you-go mode returns them at the end
            take_mask(path, keep)
        del masks
        del lp
        names = write_layer(new_lp, i, config.arch, os.path.join(work, files[i]), stored)
        state["names"].update({n: files[i] for n in names})
        del new_lp
        state.setdefault("statistics", []).append(layer_statistics(locations, config, i, packed))
        mtree = {}
        for path, (shape, bits) in packed.items():
            node = mtree
            for p in path:
                node = node.setdefault(p, {})
            node["kernel"] = UnpackedMask(shape, bits)
        mfile = f"masks-{i + 1:05d}-of-{L:05d}.safetensors"
        names = write_layer(mtree, i, config.arch, os.path.join(work, mfile))
        state["masks"].update({n: mfile for n in names})
        del mtree
        packed.clear()
        np.save(acts + ".tmp.npy", np.concatenate([np.asarray(x) for x in X]))
        os.replace(acts + ".tmp.npy", acts)
        state["done"] = i + 1
        atomic_json(state, state_path)
        gc.collect()   # the traced layer's reference cycles would otherwise keep its buffers alive
        if on_layer is not None:
            on_layer(i)

    finish_directory(source, work, config, state["names"], state["masks"])
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


__all__ = ["layer_bytes", "load_masks", "prune_streaming", "return_freed_memory", "write_random_checkpoint"]
