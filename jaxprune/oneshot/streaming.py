"""Layer streaming: prune a checkpoint larger than memory, one layer at a time, resumably.

`prune_streaming` reads one decoder layer at a time from a Hugging Face safetensors
checkpoint (memory-mapped; each layer's mapping is dropped once it is copied), runs
Wanda or SparseGPT's sequential calibration on it (`calibration.LayerPruner`, the same
jitted passes as the in-memory methods), and writes the pruned layer and its masks
out before the next layer is read. Peak host memory is about one layer (plus its
pruned copy, whose buffers reuse the old ones where XLA can) plus the calibration
activations: never the whole model.

Work happens in ``OUT.partial/``, locked against a second process. After each layer the
layer file, its masks, the next layer's input activations and ``state.json`` (the commit
point, holding the SHA-256 of each of those files and of its own content) are written
atomically, so a run killed at any moment resumes from the last finished layer, with the
same settings, and produces the same files as an uninterrupted run. On resume every
recorded file is checked: a damaged layer is redone (from the kept input activations of
the last layer, else from the first layer), and a damaged ``state.json`` is a
`CheckpointError` unless ``overwrite=True`` starts over. A failed write (a full disk) is a
`CheckpointError`; the run resumes from its last finished layer. The finished directory is
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

import hashlib
import json
import os
import re
from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxprune import models
from jaxprune.calibration.driver import LayerPruner, collect_if_large, default_batch_size, embed_chunks
from jaxprune.io.export import load_masks  # noqa: F401  (re-exported: masks beside a streamed output)
from jaxprune.core.checks import check_tokens
from jaxprune.errors import CheckpointError, InvalidArgumentError
from jaxprune.io.atomic import commit_directory
from jaxprune.io.hf import read_config
from jaxprune.sparsity.masks import check_sparsity, parse_pattern
from jaxprune.core.progress import progress
from jaxprune.core.memory import return_freed_memory  # noqa: F401  (re-exported)
from jaxprune.io.synthetic import layer_bytes, write_random_checkpoint  # noqa: F401  (re-exported)
from jaxprune.oneshot.stream_files import (UnpackedMask, activations_file, atomic_npy, check_state, claim,
                                          clear_directory, embedding_inputs, file_sha256, finish_directory,
                                          first_bad_layer, layer_statistics, linear_paths, load_state, read_layer,
                                          release, save_state, tensor_index, write_layer, write_rest)

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
                    pattern=None, *, mode: str = "sequential", batch_size: int | None = None, blocksize: int = 128,
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
      batch_size: calibration windows per forward (default `calibration.driver.default_batch_size`).
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
    batch_size = default_batch_size(tokens.shape[1], batch_size)
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    settings = dict(method=method, sparsity=sparsity, pattern=nm, mode=mode, batch_size=batch_size,
                    blocksize=blocksize, percdamp=percdamp, compute_dtype=np.dtype(compute_dtype).name)
    fingerprint = _fingerprint(source, tokens, settings)
    work = out + ".partial"
    L = config.num_hidden_layers
    files = [f"model-{k + 1:05d}-of-{L + 1:05d}.safetensors" for k in range(L + 1)]
    mask_files = [f"masks-{i + 1:05d}-of-{L:05d}.safetensors" for i in range(L)]
    lock = claim(work)
    try:
        return _run(source, out, work, config, tokens, files, mask_files, fingerprint, overwrite, settings,
                    compute_dtype, low_memory, show_progress, on_layer, statistics)
    except OSError as e:   # a full disk, a vanished directory: the run resumes from its last layer
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"writing {work} failed ({e}); run again to resume from the last finished "
                              "layer") from None
    finally:
        release(lock)


def _resume_state(source, work, config, files, mask_files, fingerprint, overwrite):
    """The state to continue from: the saved one (checked; rolled back to the first layer whose
    files are damaged), or a new one after clearing `work` and copying the non-layer tensors."""
    state_path = os.path.join(work, "state.json")
    state = None
    if os.path.isfile(state_path):
        try:
            state = load_state(state_path)
            if state.get("fingerprint") != fingerprint:
                if not overwrite:
                    raise CheckpointError(f"{work} holds an unfinished run with other settings or data; remove "
                                          f"it or pass overwrite=True to start over")
                state = None
            else:
                state = check_state(state, state_path, files, mask_files)
        except CheckpointError:
            if not overwrite:
                raise
            state = None
    if state is not None:
        redo = first_bad_layer(work, state, files, mask_files)
        if redo < 0:
            state = None
        elif redo < state["done"]:
            recorded = state["checksums"].get(activations_file(redo))
            if redo and (recorded is None or file_sha256(os.path.join(work, activations_file(redo))) != recorded):
                redo = 0   # its input activations are not kept (or damaged too): start the layers over
            keep = {files[-1], activations_file(redo)} | set(files[:redo]) | set(mask_files[:redo])
            state = {**state, "done": redo, "statistics": state.get("statistics", [])[:redo],
                     "checksums": {k: v for k, v in state["checksums"].items() if k in keep}}
    if state is None:
        clear_directory(work)
        rest = write_rest(tensor_index(source), config, work, files[-1])
        state = {"fingerprint": fingerprint, "done": 0, "names": {n: files[-1] for n in rest}, "masks": {},
                 "statistics": [], "checksums": {files[-1]: file_sha256(os.path.join(work, files[-1]))}}
        save_state(state, state_path)
    return state


def _run(source, out, work, config, tokens, files, mask_files, fingerprint, overwrite, settings, compute_dtype,
         low_memory, show_progress, on_layer, statistics) -> str:
    method, mode, batch_size = settings["method"], settings["mode"], settings["batch_size"]
    sparsity, nm = settings["sparsity"], settings["pattern"]
    L = config.num_hidden_layers
    state_path = os.path.join(work, "state.json")
    state = _resume_state(source, work, config, files, mask_files, fingerprint, overwrite)

    kind, prune_dense = _prune_dense(method, nm, settings["blocksize"], settings["percdamp"])
    if low_memory is None:
        stored_itemsize = max(np.dtype(loc[0]).itemsize for _, loc in tensor_index(source).values())
        low_memory = layer_bytes(config, np.dtype(f"u{stored_itemsize}")) > LOW_MEMORY_LAYER_BYTES
    pruner = LayerPruner(config, kind, prune_dense, mode, donate=True, jit_passes=not low_memory)
    small, local_tokens = embedding_inputs(source, config, tokens)
    X, ctx = embed_chunks(small, jnp.asarray(local_tokens), batch_size)
    del small
    sizes = [x.shape[0] for x in X]
    if state["done"]:
        saved = np.load(os.path.join(work, activations_file(state["done"])))   # checksum checked
        X = [jnp.asarray(a) for a in np.split(saved, np.cumsum(sizes)[:-1])]
        del saved
    else:
        X = [x.astype(compute_dtype) for x in X]
    count = jnp.asarray(float(tokens.size), jnp.float32)
    locations = tensor_index(source)
    stored = {k: loc[0] for k, (_, loc) in locations.items()}
    sums = state["checksums"]

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
        state["statistics"] = state.get("statistics", [])[:i] + [layer_statistics(locations, config, i, packed)]
        mtree = {}
        for path, (shape, bits) in packed.items():
            node = mtree
            for p in path:
                node = node.setdefault(p, {})
            node["kernel"] = UnpackedMask(shape, bits)
        names = write_layer(mtree, i, config.arch, os.path.join(work, mask_files[i]))
        state["masks"].update({n: mask_files[i] for n in names})
        del mtree
        packed.clear()
        acts = activations_file(i + 1)
        atomic_npy(np.concatenate([np.asarray(x) for x in X]), os.path.join(work, acts))
        for f in (files[i], mask_files[i], acts):
            sums[f] = file_sha256(os.path.join(work, f))
        sums.pop(activations_file(i - 1), None)   # keep the inputs of the last layer (for a redo) and the next
        state["done"] = i + 1
        save_state(state, state_path)
        if i >= 1 and os.path.exists(os.path.join(work, activations_file(i - 1))):
            os.remove(os.path.join(work, activations_file(i - 1)))
        # the traced layer's reference cycles would otherwise keep its buffers alive (small layers: skip)
        collect_if_large(os.path.getsize(os.path.join(work, files[i])))
        if on_layer is not None:
            on_layer(i)

    finish_directory(source, work, config, state["names"], state["masks"])
    if statistics is not None:
        statistics.extend(state.get("statistics", []))
    for f in os.listdir(work):
        if f == "state.json" or re.fullmatch(r"activations-\d+\.npy", f):
            os.remove(os.path.join(work, f))
    try:
        commit_directory(work, out, overwrite)
    except CheckpointError:
        raise CheckpointError(f"{out} already exists (written by another process meanwhile); this run's "
                              f"result stays in {work}") from None
    return out


__all__ = ["layer_bytes", "load_masks", "prune_streaming", "return_freed_memory", "write_random_checkpoint"]
