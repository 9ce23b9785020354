"""Llama family in Flax linen: RMSNorm, RoPE (incl. llama3 scaling), GQA, SwiGLU.

The decoder layer is a linen module built with `nn.Dense` (kernels `[in, out]`), so
`flax.linen.intercept_methods` sees every linear layer's input; the model itself is
a plain loop over layers (`jaxprune.models.forward`), which lets layers differ in
width after compaction and lets sequential calibration run one layer at a time.

Unequal K/V groups (after compaction removed some query heads of a group): the
layer's `kv_groups` (query heads per K/V head, `config.layer_shapes[i]`, passed to
`layer` as a static argument) expands K/V to one per query head with a static repeat;
layers with equal groups keep the grouped path that never repeats K/V.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import LlamaConfig
from . import gates as G
from .layers import RMSNorm, apply_rope, causal_attention, rope_inv_freq, rope_tables
from .layout import Layout, Linear, Norm, register


class LlamaAttention(nn.Module):
    config: LlamaConfig
    n_heads: int
    n_kv: int
    kv_groups: tuple | None = None  # query heads per K/V head when unequal

    @nn.compact
    def __call__(self, x, cos, sin, g):
        cfg, Dh = self.config, self.config.head_dim
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.attention_bias, name=name, dtype=x.dtype)
        B, T, _ = x.shape
        q = dense(self.n_heads * Dh, "q_proj")(x).reshape(B, T, self.n_heads, Dh)
        k = dense(self.n_kv * Dh, "k_proj")(x).reshape(B, T, self.n_kv, Dh)
        v = dense(self.n_kv * Dh, "v_proj")(x).reshape(B, T, self.n_kv, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_groups is not None:
            k, v = (_per_query_head(t, self.kv_groups, self.n_heads) for t in (k, v))
        o = causal_attention(q, k, v, Dh ** -0.5)
        m = head_multiplier(g, self.n_heads, self.n_kv, self.kv_groups, o.dtype)
        if m is not None:
            o = o * m[:, None]
        return dense(x.shape[-1], "o_proj")(o.reshape(B, T, self.n_heads * Dh))


def _per_query_head(t, kv_groups: tuple, n_heads: int, axis: int = 2):
    """Repeat K/V heads (or their gates) `kv_groups[j]` times each: one per query head."""
    return jnp.repeat(t, np.asarray(kv_groups), axis=axis, total_repeat_length=n_heads)


def head_multiplier(g: dict, n_heads: int, n_kv: int, kv_groups: tuple | None, dtype):
    """`gates.head_multiplier`, also for unequal K/V groups."""
    if kv_groups is None or "kv_heads" not in g:
        return G.head_multiplier(g, n_heads, n_kv, dtype)
    m = _per_query_head(g["kv_heads"].astype(dtype), kv_groups, n_heads, axis=0)
    return m * g["heads"].astype(dtype) if "heads" in g else m


class LlamaMLP(nn.Module):
    config: LlamaConfig
    ffn_dim: int

    @nn.compact
    def __call__(self, x, g):
        cfg = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.mlp_bias, name=name, dtype=x.dtype)
        h = jax.nn.silu(dense(self.ffn_dim, "gate_proj")(x)) * dense(self.ffn_dim, "up_proj")(x)
        if "ffn" in g:
            h = h * g["ffn"].astype(h.dtype)
        return dense(x.shape[-1], "down_proj")(h)


class LlamaBlock(nn.Module):
    """One pre-norm decoder layer; absent sublayers (n_heads=0 / ffn_dim=0) are identity."""

    config: LlamaConfig
    n_heads: int
    n_kv: int
    ffn_dim: int
    kv_groups: tuple | None = None

    @nn.compact
    def __call__(self, x, cos, sin, g):
        hg = g.get("hidden")
        eps = self.config.rms_norm_eps
        if self.n_heads:
            a = LlamaAttention(self.config, self.n_heads, self.n_kv, self.kv_groups, name="self_attn")(
                RMSNorm(eps, name="input_layernorm")(x, hg), cos, sin, g)
            x = x + _gate_update(a, g, "attn", hg)
        if self.ffn_dim:
            m = LlamaMLP(self.config, self.ffn_dim, name="mlp")(
                RMSNorm(eps, name="post_attention_layernorm")(x, hg), g)
            x = x + _gate_update(m, g, "mlp", hg)
        return x


def _gate_update(update, g, name, hidden_gate):
    s = G.sublayer_multiplier(g, name)
    if s is not None:
        update = update * jnp.asarray(s, update.dtype)
    if hidden_gate is not None:
        update = update * hidden_gate.astype(update.dtype)
    return update


def layer_dims(config: LlamaConfig, lp: dict) -> dict:
    """Widths of one layer read from its params (layers may differ after compaction)."""
    Dh = config.head_dim
    attn = lp.get("self_attn")
    mlp = lp.get("mlp")
    return {
        "n_heads": attn["q_proj"]["kernel"].shape[1] // Dh if attn else 0,
        "n_kv": attn["k_proj"]["kernel"].shape[1] // Dh if attn else 0,
        "ffn_dim": mlp["up_proj"]["kernel"].shape[1] if mlp else 0,
    }


def embed(config: LlamaConfig, tree: dict, tokens, gates: dict):
    x = jnp.take(tree["embed_tokens"]["embedding"], tokens, axis=0)
    if gates.get("hidden") is not None:
        x = x * gates["hidden"].astype(x.dtype)
    T = tokens.shape[-1]
    cos, sin = rope_tables(jnp.arange(T), rope_inv_freq(config.head_dim, config.rope_theta, config.rope))
    return x, (cos, sin)


def layer(config: LlamaConfig, lp: dict, x, ctx, g: dict, kv_groups: tuple | None = None):
    cos, sin = ctx
    block = LlamaBlock(config, **layer_dims(config, lp), kv_groups=kv_groups if lp.get("self_attn") else None)
    return block.apply({"params": lp}, x, cos, sin, g)


def unembed(config: LlamaConfig, tree: dict, x, gates: dict):
    h = RMSNorm(config.rms_norm_eps).apply({"params": tree["norm"]}, x, gates.get("hidden"))
    if config.tie_word_embeddings:
        w = tree["embed_tokens"]["embedding"]
        return jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
    return jnp.einsum("btd,dv->btv", h, tree["lm_head"]["kernel"], preferred_element_type=jnp.float32)


def shapes(config: LlamaConfig) -> dict:
    """The shape of every parameter `config` implies, as a tree of tuples."""
    D, Dh, V = config.hidden_size, config.head_dim, config.vocab_size
    ab, mb = config.attention_bias, config.mlp_bias
    dense = lambda i, o, bias: {"kernel": (i, o), **({"bias": (o,)} if bias else {})}

    def one(dims):
        H, KV, F = dims["n_heads"], dims["n_kv"], dims["ffn_dim"]
        lp = {}
        if H:
            lp["input_layernorm"] = {"scale": (D,)}
            lp["self_attn"] = {"q_proj": dense(D, H * Dh, ab), "k_proj": dense(D, KV * Dh, ab),
                               "v_proj": dense(D, KV * Dh, ab), "o_proj": dense(H * Dh, D, ab)}
        if F:
            lp["post_attention_layernorm"] = {"scale": (D,)}
            lp["mlp"] = {"gate_proj": dense(D, F, mb), "up_proj": dense(D, F, mb), "down_proj": dense(F, D, mb)}
        return lp

    tree = {"embed_tokens": {"embedding": (V, D)}, "norm": {"scale": (D,)},
            "layers": [one(d) for d in per_layer_dims(config)]}
    if not config.tie_word_embeddings:
        tree["lm_head"] = {"kernel": (D, V)}
    return tree


def per_layer_dims(config: LlamaConfig) -> list[dict]:
    if config.layer_shapes is not None:
        return [dict(d) for d in config.layer_shapes]
    return [{"n_heads": config.num_attention_heads, "n_kv": config.num_key_value_heads,
             "ffn_dim": config.intermediate_size}] * config.num_hidden_layers


def _llama_linears():
    a, m = "attn", "mlp"
    return (Linear(("self_attn", "q_proj"), a, ("hidden", "heads"), "attn_q"),
            Linear(("self_attn", "k_proj"), a, ("hidden", "groups"), "attn_k"),
            Linear(("self_attn", "v_proj"), a, ("hidden", "groups"), "attn_v"),
            Linear(("self_attn", "o_proj"), a, ("heads", "hidden"), "attn_output"),
            Linear(("mlp", "gate_proj"), m, ("hidden", "ffn"), "ffn_gate"),
            Linear(("mlp", "up_proj"), m, ("hidden", "ffn"), "ffn_up"),
            Linear(("mlp", "down_proj"), m, ("ffn", "hidden"), "ffn_down"))


LAYOUT = register(Layout(
    name="llama",
    linears=_llama_linears(),
    norms=(Norm(("input_layernorm",), "attn", gguf="attn_norm"),
           Norm(("post_attention_layernorm",), "mlp", gguf="ffn_norm")),
    top={"embed_tokens": ("vocab", "hidden"), "norm": ("hidden",), "lm_head": ("hidden", "vocab")},
    embeddings=("embed_tokens", "lm_head"),
    hf_prefix="model.",
    config_widths={"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "ffn": "intermediate_size"},
    gguf_arch="llama",
    gguf_top={"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"},
    gguf_rotary={("self_attn", "q_proj"): "num_attention_heads", ("self_attn", "k_proj"): "num_key_value_heads"},
))
