"""`save`: write `Params` as a Hugging Face checkpoint directory that `transformers` loads, or
as a GGUF file that llama.cpp runs (a ``.gguf`` path or ``format="gguf"``; see
`jaxprune.io.gguf_export`).

config.json + model.safetensors (sharded with an index above `max_shard_bytes`),
HF tensor names and `[out, in]` layout; masks (if given) beside it as
`masks.safetensors` (uint8, 1 = keep). The directory is written under a temporary
name and renamed into place, so a failure never leaves a half-written checkpoint,
and an existing directory is only replaced with `overwrite=True`.

Example:
    >>> jp.save(pruned, "out/smollm2-wanda50", masks=masks)      # doctest: +SKIP
    >>> jp.load("out/smollm2-wanda50")                           # doctest: +SKIP
    >>> jp.save(small, "out/small.gguf", tokenizer=tok, dtype="float16")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxprune.errors import CheckpointError, InvalidArgumentError, JaxpruneError
from jaxprune.io.atomic import commit_directory
from jaxprune.sparsity.masks import check_masks_like
from jaxprune.core.params import Params
from jaxprune.io.names import flatten_tree


def _hf_arrays(params: Params) -> dict[str, np.ndarray]:
    out = {}
    for name, (path, leaf) in flatten_tree(params.tree, params.config.arch).items():
        a = np.asarray(leaf)
        out[name] = np.ascontiguousarray(a.T if path[-1] == "kernel" else a)
    return out


def _write_shards(arrays: dict[str, np.ndarray], directory: str, max_shard_bytes: int, prefix: str = "model"):
    from safetensors.numpy import save_file
    shards, current, size = [], {}, 0
    for name in sorted(arrays):
        nbytes = arrays[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arrays[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, f"{prefix}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"{prefix}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(a.nbytes for a in arrays.values())
    with open(os.path.join(directory, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


MASKS_KEY = "jaxprune_masks"


def packed_mask_arrays(masks: Params) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Bit-packed (`np.packbits`, HF `[out, in]` layout flattened) masks of every tensor that is not
    all True, and their shapes, for a `masks*.safetensors` file."""
    arrays, shapes = {}, {}
    for name, keep in _hf_arrays(masks).items():
        keep = keep.astype(bool)
        if not keep.all():
            arrays[name] = np.packbits(keep.reshape(-1))
            shapes[name] = list(keep.shape)
    return arrays, shapes


def write_directory(path: str, write, overwrite: bool = False) -> str:
    """Create directory `path` atomically: `write(tmp)` fills a temporary sibling, which is then renamed
    into place (replacing an existing `path` only with `overwrite`). Nothing is left on failure."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint gets ordinary permissions
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o666 & ~umask)
        commit_directory(tmp, path, overwrite)   # complete or absent at every instant; one racer wins
    except JaxpruneError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:   # OSError, and writers' own errors (safetensors: "File too large")
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing {path} failed: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


FORMATS = ("hf", "gguf")


def save_format(path, format: str | None) -> str:
    """'hf' or 'gguf': `format` if given (checked), else 'gguf' for a ``.gguf`` path, else 'hf'."""
    if format is None:
        return "gguf" if os.fspath(path).lower().endswith(".gguf") else "hf"
    if format not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {FORMATS} (or None: from the path), got {format!r}")
    return format


def save(params: Params, path: str, masks: Params | None = None, tokenizer=None, overwrite: bool = False,
         max_shard_bytes: int = 2 * 2**30, extra_files: dict[str, str] | None = None, *,
         format: str | None = None, dtype=None) -> str:
    """Write `params` (and optionally `masks`, a tokenizer, extra text files) to directory `path`,
    or to one GGUF file when `path` ends in ``.gguf`` or ``format="gguf"``.

    Masks are stored bit-packed in `masks.safetensors` (only tensors with pruned entries);
    `jp.load_masks(path)` reads them back. GGUF (`jaxprune.io.gguf_export.save_gguf`) holds no
    masks or extra files; `dtype` ("float32", "float16", "bfloat16") sets its tensor type.
    Returns the path. Raises CheckpointError if `path` exists (unless `overwrite`) or cannot be
    written.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"save: path must be a string or path, got {type(path).__name__}")
    from jaxprune.models import require_layer_list
    require_layer_list(params, "save")
    if save_format(path, format) == "gguf":
        if masks is not None or extra_files:
            raise InvalidArgumentError("a GGUF file holds no masks or extra files: apply the masks "
                                       "(jp.apply_masks) and save masks with format='hf'")
        from jaxprune.io.gguf_export import save_gguf
        return save_gguf(params, path, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    if dtype is not None:
        raise InvalidArgumentError("dtype= applies to GGUF files (format='gguf'); a Hugging Face directory "
                                   "keeps the params' dtype")
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"save needs jaxprune Params, got {type(params).__name__}")
    if masks is not None:
        check_masks_like(params, masks)

    def write(tmp: str) -> None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(params.config.to_hf(), f, indent=2, sort_keys=True)
        _write_shards(_hf_arrays(params), tmp, max_shard_bytes)
        if masks is not None:
            arrays, shapes = packed_mask_arrays(masks)
            if arrays:
                from safetensors.numpy import save_file
                save_file(arrays, os.path.join(tmp, "masks.safetensors"),
                          metadata={MASKS_KEY: json.dumps(shapes, sort_keys=True)})
        if tokenizer is not None:
            tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)

    return write_directory(path, write, overwrite)


def load_masks(directory: str, params: Params | None = None) -> Params:
    """The masks saved beside a checkpoint (by `jp.save(..., masks=)` or streamed pruning) as a
    bool pytree shaped like its params; weights without a saved mask are all True.

    Example:
        >>> jp.save(pruned, "out/wanda50", masks=masks)            # doctest: +SKIP
        >>> params, masks = jp.load("out/wanda50"), jp.load_masks("out/wanda50")  # doctest: +SKIP
    """
    from jaxprune import models
    from jaxprune.io.hf import check_claims, open_weights, read_config
    from jaxprune.io.untrusted import parse_json
    from jaxprune.io.names import hf_to_path
    from jaxprune.io.safetensors import open_safetensors, read_metadata

    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if params is not None and not isinstance(params, Params):
        raise InvalidArgumentError(f"load_masks: params must be jaxprune Params (or None), got {type(params).__name__}")
    config = params.config if params is not None else read_config(directory)
    if params is None:   # the config is untrusted: its claims are checked against the weights first
        check_claims(config, open_weights(directory), directory)
    tree = models.shapes(config) if params is None else jax.tree.map(np.shape, params.tree)
    masks = jax.tree.map(lambda s: np.ones(s, np.bool_), tree, is_leaf=models.is_shape)
    files = [f for f in os.listdir(directory) if f.startswith("masks") and f.endswith(".safetensors")]
    for f in sorted(files):
        file = os.path.join(directory, f)
        packed = read_metadata(file).get(MASKS_KEY)
        shapes = parse_json(packed.encode(), file, "mask shapes", 4) if packed else {}
        if not isinstance(shapes, dict):
            raise CheckpointError(f"{f}: mask shapes metadata is not a JSON object")
        for name, a in open_safetensors(file).items():
            path = hf_to_path(name, config.arch)
            if path is None:
                raise CheckpointError(f"{f}: unknown tensor {name!r}")
            node = masks
            try:
                for p in path[:-1]:
                    node = node[p]
                target = node[path[-1]]
            except (KeyError, IndexError):
                raise CheckpointError(f"{f}: mask {name!r} names a weight the model does not have") from None
            a = np.asarray(a)
            if name in shapes:
                shape = tuple(shapes[name])
                if a.size * 8 < int(np.prod(shape)):
                    raise CheckpointError(f"{f}: packed mask {name!r} is too short for shape {shape}")
                a = np.unpackbits(a, count=int(np.prod(shape))).reshape(shape)
            keep = a.astype(bool).T if path[-1] == "kernel" else a.astype(bool)
            if keep.shape != target.shape:
                raise CheckpointError(f"{f}: mask {name!r} has shape {keep.shape}, the model {target.shape}")
            node[path[-1]] = keep
    return Params(config, masks)
