"""The KV cache of a decoder: one fixed-size key/value buffer per attention layer.

A cache is a list with one entry per layer: ``{"k": [B, S, KV_i, Dh], "v": [B, S, KV_i, Dh]}``
for a layer with attention (KV_i its own K/V heads, so compacted layers of different widths
each get their own size) and None for a layer whose attention was removed. S is fixed for a
whole generation, so the decoding loop updates the buffers in place.

Example:
    >>> import jax, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> cache = init_cache(jp.init(cfg, jax.random.key(0)), batch=3, size=10)
    >>> cache[0]["k"].shape, cache_bytes(jp.init(cfg, jax.random.key(0)), 3, 10)
    ((3, 10, 2, 4), 3840)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxprune.core.params import Params
from jaxprune.models import family


def kv_heads(params: Params) -> list[int]:
    """K/V heads of every layer (0 where the layer has no attention)."""
    fam, cfg = family(params.config), params.config
    out = []
    for lp in params.tree["layers"]:
        dims = fam.layer_dims(cfg, lp)
        out.append(int(dims.get("n_kv", dims["n_heads"])) if dims["n_heads"] else 0)
    return out


def cache_dtype(params: Params):
    """The dtype activations (and so keys and values) have: the embedding's."""
    return params.tree["embed_tokens"]["embedding"].dtype


def init_cache(params: Params, batch: int, size: int, dtype=None) -> list:
    """An empty (zero) cache of `size` slots for `batch` rows."""
    dtype = dtype or cache_dtype(params)
    Dh = params.config.head_dim
    return [None if kv == 0 else {"k": jnp.zeros((batch, size, kv, Dh), dtype),
                                  "v": jnp.zeros((batch, size, kv, Dh), dtype)}
            for kv in kv_heads(params)]


def cache_bytes(params: Params, batch: int, size: int, dtype=None) -> int:
    """Bytes of the cache `init_cache` would build."""
    itemsize = np.dtype(dtype or cache_dtype(params)).itemsize
    return int(2 * batch * size * params.config.head_dim * itemsize * sum(kv_heads(params)))
