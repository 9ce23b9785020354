"""Hugging Face checkpoint directories (config.json + safetensors) -> `Params`.

Example:
    >>> params = load_hf_dir("path/to/hf-llama")          # doctest: +SKIP
    >>> params.config.arch                                # doctest: +SKIP
    'llama'
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models.config import ModelConfig, config_from_hf
from jaxprune.errors import CheckpointError
from jaxprune.core.params import Params
from jaxprune import models
from jaxprune.models import is_shape
from jaxprune.io.names import build_tree
from jaxprune.io.safetensors import open_safetensors


def read_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None
    return config_from_hf(d, source=path)


def open_weights(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a directory, lazily (single file or sharded index)."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return open_safetensors(single)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e})") from None
        named = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index} names shard {shard!r}, which is missing")
            named.update(open_safetensors(shard_path))
        missing = set(weight_map) - set(named)
        if missing:
            raise CheckpointError(f"{index}: tensors {sorted(missing)[:5]} are not in their shards")
        return named
    others = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {others}: convert to safetensors first)" if others else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def validate_tree(config: ModelConfig, tree: dict, source: str) -> None:
    """Raise CheckpointError naming every tensor that is missing, extra or mis-shaped."""
    expected = {jax.tree_util.keystr(p): s for p, s in
                jax.tree_util.tree_flatten_with_path(models.shapes(config), is_leaf=is_shape)[0]}
    actual = {jax.tree_util.keystr(p): x if is_shape(x) else tuple(np.shape(x)) for p, x in
              jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_shape)[0]}
    problems = [f"missing {k} {v}" for k, v in expected.items() if k not in actual]
    problems += [f"unexpected {k} {v}" for k, v in actual.items() if k not in expected]
    problems += [f"{k}: checkpoint has {actual[k]}, config implies {v}"
                 for k, v in expected.items() if k in actual and actual[k] != v]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{source}: weights do not match the config: " + "; ".join(problems[:8]) + more)


def from_named_arrays(config: ModelConfig, named: dict[str, Any], source: str = "weights",
                      dtype=jnp.float32) -> Params:
    """`Params` from HF-named arrays (numpy, memmaps or `torch_tensor.numpy()`), validated.

    `dtype=None` keeps each tensor's stored dtype.
    """
    def convert(a, transpose):
        a = np.asarray(a)
        if transpose:
            a = a.T
        return jnp.asarray(a, dtype=dtype)

    if config.tie_word_embeddings:  # transformers may still list the tied head
        named = {k: v for k, v in named.items() if not k.startswith("lm_head.")}
    # Check shapes first, before any tensor data is read.
    validate_tree(config, build_tree(named, config.arch, lambda a, t: tuple(np.shape(a))[::-1 if t else 1]), source)
    tree = build_tree(named, config.arch, convert)
    tree.setdefault("layers", [])  # a compacted model may have no layers left
    return Params(config, tree)


def load_hf_dir(directory: str, dtype=jnp.float32) -> Params:
    """Load a Llama or OPT checkpoint directory written by `transformers` or by `jaxprune.save`."""
    config = read_config(directory)
    return from_named_arrays(config, open_weights(directory), source=directory, dtype=dtype)
