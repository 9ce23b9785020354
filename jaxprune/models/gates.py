"""Structured gates: optional multipliers that switch parts of a model off.

One compiled forward serves the dense model, a structurally masked model and a
batch of sub-models (`jax.vmap` over a batch of gates). Every key is optional and
absent means "keep everything":

=============  ====================  ==============================================
key            shape                 multiplies
=============  ====================  ==============================================
``heads``      ``[L, n_heads]``      each query head's attention output
``kv_heads``   ``[L, n_kv_heads]``   every query head that reads that K/V group
``ffn``        ``[L, ffn_dim]``      each FFN channel (input of the down projection)
``hidden``     ``[hidden]``          each residual-stream dimension (norms use kept dims)
``attn``       ``[L]``               the attention sublayer's update (0: identity)
``mlp``        ``[L]``               the MLP sublayer's update (0: identity)
``layer``      ``[L]``               both sublayers of a layer (0: identity)
=============  ====================  ==============================================

Per-layer entries may also be lists of per-layer arrays (for models whose layers
differ in width after compaction): the forward only ever indexes `gates[k][i]`.

Example:
    >>> import jax.numpy as jnp
    >>> g = {"heads": jnp.ones((2, 4)).at[0, 1].set(0.0)}   # drop head 1 of layer 0
    >>> sorted(layer_gates(g, 0))
    ['heads']
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxprune.errors import InvalidArgumentError

PER_LAYER_KEYS = ("heads", "kv_heads", "ffn", "attn", "mlp", "layer")
GLOBAL_KEYS = ("hidden",)
KEYS = PER_LAYER_KEYS + GLOBAL_KEYS


def check_gates(gates) -> dict:
    """Validate the keys of a gates dict (shapes are checked by the forward)."""
    if gates is None:
        return {}
    if not isinstance(gates, dict):
        raise InvalidArgumentError(f"gates must be a dict with keys from {KEYS}, got {type(gates).__name__}")
    unknown = set(gates) - set(KEYS)
    if unknown:
        raise InvalidArgumentError(f"unknown gate keys {sorted(unknown)}; valid keys are {list(KEYS)}")
    return gates


def layer_gates(gates: dict | None, i: int) -> dict:
    """The gates of layer `i`: per-layer entries indexed, `hidden` passed through."""
    if not gates:
        return {}
    out = {k: gates[k][i] for k in PER_LAYER_KEYS if gates.get(k) is not None}
    if gates.get("hidden") is not None:
        out["hidden"] = gates["hidden"]
    return out


def ones_like_model(config, dtype=jnp.float32) -> dict:
    """All-ones gates for a uniform model: every key present, everything kept."""
    L = config.num_hidden_layers
    return {
        "heads": jnp.ones((L, config.num_attention_heads), dtype),
        "kv_heads": jnp.ones((L, config.num_key_value_heads), dtype),
        "ffn": jnp.ones((L, config.intermediate_size), dtype),
        "hidden": jnp.ones((config.hidden_size,), dtype),
        "attn": jnp.ones((L,), dtype), "mlp": jnp.ones((L,), dtype), "layer": jnp.ones((L,), dtype),
    }


def head_multiplier(g: dict, n_heads: int, n_kv: int, dtype):
    """Per-query-head multiplier combining `heads` and GQA-expanded `kv_heads` gates, or None."""
    m = None
    if "heads" in g:
        m = g["heads"].astype(dtype)
    if "kv_heads" in g:
        kv = jnp.repeat(g["kv_heads"].astype(dtype), n_heads // n_kv)
        m = kv if m is None else m * kv
    return m


def sublayer_multiplier(g: dict, name: str):
    """Scalar multiplier of sublayer `name` ('attn' or 'mlp') including the layer gate, or None."""
    m = g.get(name)
    if "layer" in g:
        m = g["layer"] if m is None else m * g["layer"]
    return m
