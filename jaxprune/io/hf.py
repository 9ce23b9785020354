"""Hugging Face checkpoint directories (config.json + safetensors) -> `Params`.

Example:
    >>> params = load_hf_dir("path/to/hf-llama")          # doctest: +SKIP
    >>> params.config.arch                                # doctest: +SKIP
    'llama'
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models.config import ModelConfig, config_from_hf
from jaxprune.errors import CheckpointError, JaxpruneError
from jaxprune.core.params import Params
from jaxprune import models
from jaxprune.models import is_shape
from jaxprune.io.names import build_tree
from jaxprune.io.safetensors import open_safetensors
from jaxprune.io.untrusted import inside, read_json, short
from jaxprune.models.layout import layout_of


MAX_CONFIG_BYTES = 4 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_LAYERS = 10_000
MAX_DIM = 1 << 24
# config.json fields that size the model: (smallest, largest) accepted value
DIM_FIELDS = {"num_hidden_layers": (0, MAX_LAYERS), "vocab_size": (1, MAX_DIM), "hidden_size": (1, MAX_DIM),
              "intermediate_size": (0, MAX_DIM), "ffn_dim": (0, MAX_DIM), "num_attention_heads": (1, MAX_DIM),
              "num_key_value_heads": (1, MAX_DIM), "head_dim": (1, MAX_DIM), "word_embed_proj_dim": (1, MAX_DIM),
              "max_position_embeddings": (1, 2**31 - 1)}


def checked_config(d, source: str) -> ModelConfig:
    """`config_from_hf` for an untrusted dict: the fields that size the model must be integers in
    sane ranges (`DIM_FIELDS`) before anything is built from them, and a malformed config is a
    CheckpointError (never a TypeError or ZeroDivisionError)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: corrupt config (a JSON {type(d).__name__}, not an object)")
    for key, (low, high) in DIM_FIELDS.items():
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high):
            raise CheckpointError(f"{source}: {key} must be an integer in [{low}, {high}], got {short(v, 40)}")
    try:
        return config_from_hf(d, source=source)
    except JaxpruneError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as e:
        raise CheckpointError(f"{source}: malformed config ({type(e).__name__}: {str(e)[:160]})") from None


def read_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: not a Hugging Face checkpoint directory (no config.json)")
    return checked_config(read_json(inside(directory, "config.json"), "config.json", MAX_CONFIG_BYTES, 32), path)


def read_index(directory: str, index: str | None = None) -> dict[str, str]:
    """The sharded index's weight_map (tensor name -> shard file name), each shard a plain file in
    `directory` (CheckpointError otherwise)."""
    index = index or os.path.join(directory, "model.safetensors.index.json")
    d = read_json(inside(directory, os.path.basename(index), "index"), "index", MAX_INDEX_BYTES, 16)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: corrupt index (needs a weight_map of tensor names to file names)")
    for shard in set(weight_map.values()):
        inside(directory, shard, f"{os.path.basename(index)} names shard")
    return weight_map


def open_weights(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a directory, lazily (single file or sharded index); never a file outside it."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return open_safetensors(inside(directory, "model.safetensors"))
    if os.path.isfile(index):
        weight_map = read_index(directory, index)
        named, origin = {}, {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index} names shard {short(shard)}, which is missing")
            for name, a in open_safetensors(shard_path).items():
                if name in named:
                    raise CheckpointError(f"{index}: tensor {short(name)} is in both {short(origin[name])} "
                                          f"and {short(shard)}")
                named[name], origin[name] = a, shard
        missing = sorted(set(weight_map) - set(named))
        if missing:
            raise CheckpointError(f"{index}: {len(missing)} tensors are not in their shards, e.g. "
                                  + ", ".join(short(m) for m in missing[:3]))
        return named
    others = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {others[:5]}: convert to safetensors first)" if others else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def check_claims(config: ModelConfig, named: dict[str, Any], source: str) -> None:
    """Reject, before any shape is built, a config that claims more than the tensors hold: every
    decoder-layer tensor name must carry a plain layer index below num_hidden_layers, a uniform
    config needs tensors for every layer it claims, and the embedding it implies must fit in the
    bytes of the tensors present (cost: one pass over the names, whatever the claimed size)."""
    L = config.num_hidden_layers
    prefix = layout_of(config.arch).hf_prefix + "layers."
    present, total = set(), 0
    for name, a in named.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{source}: tensor name {short(name)} is not a string")
        total += int(np.prod(np.shape(a), dtype=object)) * max(1, np.dtype(getattr(a, "dtype", np.uint8)).itemsize)
        if name.startswith(prefix):
            idx = name[len(prefix):].split(".", 1)[0]
            if not (idx.isascii() and idx.isdigit() and len(idx) <= 9 and int(idx) < L):
                raise CheckpointError(f"{source}: tensor {short(name)} names layer {short(idx, 20)}, but the config "
                                      f"has num_hidden_layers={L}")
            present.add(int(idx))
    if config.layer_shapes is None and len(present) < L:
        first = next(i for i in range(len(present) + 1) if i not in present)
        raise CheckpointError(f"{source}: weights do not match the config: missing ['layers'][{first}] …: the "
                              f"config claims {L} layers, the weights hold tensors for {len(present)}")
    embed = config.vocab_size * min(config.hidden_size, getattr(config, "word_embed_proj_dim", None) or config.hidden_size)
    if embed > total:
        raise CheckpointError(f"{source}: the config implies an embedding of {config.vocab_size} x "
                              f"{config.hidden_size} values, more than the {total} bytes of weights present")


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
    # Check names, claims and shapes first, before any tensor data is read.
    check_claims(config, named, source)
    try:
        shapes = build_tree(named, config.arch, lambda a, t: tuple(np.shape(a))[::-1 if t else 1])
        validate_tree(config, shapes, source)
    except JaxpruneError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        raise CheckpointError(f"{source}: tensor names or the config do not describe a model "
                              f"({type(e).__name__}: {str(e)[:160]})") from None
    tree = build_tree(named, config.arch, convert)
    tree.setdefault("layers", [])  # a compacted model may have no layers left
    return Params(config, tree)


def load_hf_dir(directory: str, dtype=jnp.float32) -> Params:
    """Load a Llama or OPT checkpoint directory written by `transformers` or by `jaxprune.save`."""
    config = read_config(directory)
    return from_named_arrays(config, open_weights(directory), source=directory, dtype=dtype)
