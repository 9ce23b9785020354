"""`save`: write `Params` as a Hugging Face checkpoint directory that `transformers` loads.

config.json + model.safetensors (sharded with an index above `max_shard_bytes`),
HF tensor names and `[out, in]` layout; masks (if given) beside it as
`masks.safetensors` (uint8, 1 = keep). The directory is written under a temporary
name and renamed into place, so a failure never leaves a half-written checkpoint,
and an existing directory is only replaced with `overwrite=True`.

Example:
    >>> jp.save(pruned, "out/smollm2-wanda50", masks=masks)      # doctest: +SKIP
    >>> jp.load("out/smollm2-wanda50")                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from ..errors import CheckpointError, InvalidArgumentError
from ..params import Params
from .names import flatten_tree


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


def save(params: Params, path: str, masks: Params | None = None, tokenizer=None, overwrite: bool = False,
         max_shard_bytes: int = 2 * 2**30, extra_files: dict[str, str] | None = None) -> str:
    """Write `params` (and optionally `masks`, a tokenizer, extra text files) to directory `path`.

    Returns the path. Raises CheckpointError if `path` exists (unless `overwrite`) or
    cannot be written.
    """
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"save needs jaxprune Params, got {type(params).__name__}")
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(params.config.to_hf(), f, indent=2, sort_keys=True)
        _write_shards(_hf_arrays(params), tmp, max_shard_bytes)
        if masks is not None:
            m = {k: v.astype(np.uint8) for k, v in _hf_arrays(masks).items() if not v.all()}
            _write_shards(m, tmp, max_shard_bytes, prefix="masks")
        if tokenizer is not None:
            tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint gets ordinary permissions
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o666 & ~umask)
        if os.path.exists(path):
            old = path + ".old-" + os.path.basename(tmp)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing {path} failed: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
