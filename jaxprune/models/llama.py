"""Llama family in Flax linen: RMSNorm, RoPE (incl. llama3 scaling), GQA, SwiGLU — and the
shared decoder of every Llama-like family (Gemma 2/3, Qwen 2/3, Mistral).

The decoder layer is a linen module built with `nn.Dense` (kernels `[in, out]`), so
`flax.linen.intercept_methods` sees every linear layer's input; the model itself is
a plain loop over layers (`jaxprune.models.forward`), which lets layers differ in
width after compaction and lets sequential calibration run one layer at a time.

Unequal K/V groups (after compaction removed some query heads of a group): the
layer's `kv_groups` (query heads per K/V head, `config.layer_shapes[i]`, passed to
`layer` as a static argument) expands K/V to one per query head with a static repeat;
layers with equal groups keep the grouped path that never repeats K/V.

Other families are subclasses of `LlamaConfig` that switch options the decoder reads
from the config (see `LlamaConfig`'s "decoder options"): q/k/v and o biases, q/k norms
over head_dim, the norm offset (Gemma's ``1 + w``), "sandwich" norms (Gemma: a norm on
each sublayer's output too), the MLP activation, the query scale, attention and final
logit soft-capping, an embedding multiplier, and per layer type (`layer_types`) a
sliding window and RoPE parameters. With every option off the computation is Llama's.

Layer types: `embed` returns RoPE tables per layer type (``{layer_type: (cos, sin)}``);
`layer` takes the layer's type as the static `layer_type` (`jaxprune.models.layer` passes
``config.layer_type(i)``); it may be omitted only when all layers are of one type.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models.config import LlamaConfig
from jaxprune.errors import InvalidArgumentError
from jaxprune.models import gates as G
from jaxprune.models.layers import RMSNorm, apply_rope, attend_with_cache, causal_attention, rope_inv_freq, rope_tables
from jaxprune.models.layout import Layout, Linear, Norm, register

ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu,
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def _norm(cfg: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.norm_offset, name=name)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    n_heads: int
    n_kv: int
    kv_groups: tuple | None = None  # query heads per K/V head when unequal
    window: int | None = None       # sliding window (None: full causal attention)

    @nn.compact
    def __call__(self, x, cos, sin, g, cache=None):
        cfg, Dh = self.config, self.config.head_dim
        dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, name=name, dtype=x.dtype)
        B, T, _ = x.shape
        q = dense(self.n_heads * Dh, "q_proj", cfg.qkv_bias)(x).reshape(B, T, self.n_heads, Dh)
        k = dense(self.n_kv * Dh, "k_proj", cfg.qkv_bias)(x).reshape(B, T, self.n_kv, Dh)
        v = dense(self.n_kv * Dh, "v_proj", cfg.qkv_bias)(x).reshape(B, T, self.n_kv, Dh)
        if cfg.qk_norm:
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        expand = None
        if self.kv_groups is not None:
            expand = lambda t: _per_query_head(t, self.kv_groups, self.n_heads)
        if cache is None:
            if expand is not None:
                k, v = expand(k), expand(v)
            o = causal_attention(q, k, v, cfg.query_scale, window=self.window, softcap=cfg.attn_softcap)
        else:
            o, cache = attend_with_cache(q, k, v, cache, cfg.query_scale, self.window, cfg.attn_softcap, expand)
        m = head_multiplier(g, self.n_heads, self.n_kv, self.kv_groups, o.dtype)
        if m is not None:
            o = o * m[:, None]
        return dense(x.shape[-1], "o_proj", cfg.o_bias)(o.reshape(B, T, self.n_heads * Dh)), cache


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
        act = ACTIVATIONS[cfg.hidden_act]
        h = act(dense(self.ffn_dim, "gate_proj")(x)) * dense(self.ffn_dim, "up_proj")(x)
        if "ffn" in g:
            h = h * g["ffn"].astype(h.dtype)
        return dense(x.shape[-1], "down_proj")(h)


class LlamaBlock(nn.Module):
    """One pre-norm decoder layer; absent sublayers (n_heads=0 / ffn_dim=0) are identity.

    With `config.sandwich_norms` (Gemma) each sublayer's output is normalized too
    (`post_attention_layernorm`, `post_feedforward_layernorm`) and the MLP's input norm is
    `pre_feedforward_layernorm`; otherwise (Llama) `post_attention_layernorm` is the MLP's input norm.
    """

    config: LlamaConfig
    n_heads: int
    n_kv: int
    ffn_dim: int
    kv_groups: tuple | None = None
    window: int | None = None

    @nn.compact
    def __call__(self, x, cos, sin, g, cache=None):
        cfg = self.config
        hg = g.get("hidden")
        sandwich = cfg.sandwich_norms
        if self.n_heads:
            a, cache = LlamaAttention(cfg, self.n_heads, self.n_kv, self.kv_groups, self.window, name="self_attn")(
                _norm(cfg, "input_layernorm")(x, hg), cos, sin, g, cache)
            if sandwich:
                a = _norm(cfg, "post_attention_layernorm")(a, hg)
            x = x + _gate_update(a, g, "attn", hg)
        if self.ffn_dim:
            pre = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
            m = LlamaMLP(cfg, self.ffn_dim, name="mlp")(_norm(cfg, pre)(x, hg), g)
            if sandwich:
                m = _norm(cfg, "post_feedforward_layernorm")(m, hg)
            x = x + _gate_update(m, g, "mlp", hg)
        return x, cache


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


def embed(config: LlamaConfig, tree: dict, tokens, gates: dict, positions=None):
    """tokens -> (hidden states, ``{layer_type: (cos, sin)}`` RoPE tables of each layer type).

    positions: int [B, T] position of each token (decoding with a cache); default ``arange(T)``.
    """
    x = jnp.take(tree["embed_tokens"]["embedding"], tokens, axis=0)
    if config.embed_multiplier is not None:
        x = x * jnp.asarray(config.embed_multiplier, x.dtype)
    if gates.get("hidden") is not None:
        x = x * gates["hidden"].astype(x.dtype)
    if positions is None:
        positions = jnp.arange(tokens.shape[-1])
    tables = {}
    for kind in config.attention_kinds or ("full_attention",):
        theta, scaling = config.rope_for(kind)
        tables[kind] = rope_tables(positions, rope_inv_freq(config.head_dim, theta, scaling))
    return x, tables


def layer(config: LlamaConfig, lp: dict, x, ctx, g: dict, kv_groups: tuple | None = None,
          layer_type: str | None = None, cache: dict | None = None):
    """Decoder layer `lp` on hidden states x; `layer_type` (static) is ``config.layer_type(i)``.

    With a KV `cache` (see `jaxprune.models.layers.attend_with_cache`) returns (x, new cache).
    """
    if layer_type is None:
        kinds = config.attention_kinds
        if len(kinds) > 1:
            raise InvalidArgumentError(
                f"{config.arch}: layers differ in type {kinds}: pass layer_type=config.layer_type(i) "
                "(jaxprune.models.layer does)")
        layer_type = kinds[0] if kinds else "full_attention"
    cos, sin = ctx[layer_type]
    block = LlamaBlock(config, **layer_dims(config, lp), kv_groups=kv_groups if lp.get("self_attn") else None,
                       window=config.window_for(layer_type))
    x, cache_out = block.apply({"params": lp}, x, cos, sin, g, cache)
    return x if cache is None else (x, cache_out)


def unembed(config: LlamaConfig, tree: dict, x, gates: dict):
    h = RMSNorm(config.rms_norm_eps, config.norm_offset).apply({"params": tree["norm"]}, x, gates.get("hidden"))
    if config.tie_word_embeddings:
        w = tree["embed_tokens"]["embedding"]
        logits = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", h, tree["lm_head"]["kernel"], preferred_element_type=jnp.float32)
    cap = config.final_softcap
    if cap is not None:
        logits = jnp.tanh(logits / cap) * cap
    return logits


def shapes(config: LlamaConfig) -> dict:
    """The shape of every parameter `config` implies, as a tree of tuples."""
    D, Dh, V = config.hidden_size, config.head_dim, config.vocab_size
    qb, ob, mb = config.qkv_bias, config.o_bias, config.mlp_bias
    sandwich = config.sandwich_norms
    dense = lambda i, o, bias: {"kernel": (i, o), **({"bias": (o,)} if bias else {})}

    def one(dims):
        H, KV, F = dims["n_heads"], dims["n_kv"], dims["ffn_dim"]
        lp = {}
        if H:
            lp["input_layernorm"] = {"scale": (D,)}
            lp["self_attn"] = {"q_proj": dense(D, H * Dh, qb), "k_proj": dense(D, KV * Dh, qb),
                               "v_proj": dense(D, KV * Dh, qb), "o_proj": dense(H * Dh, D, ob)}
            if config.qk_norm:
                lp["self_attn"]["q_norm"] = {"scale": (Dh,)}
                lp["self_attn"]["k_norm"] = {"scale": (Dh,)}
            if sandwich:
                lp["post_attention_layernorm"] = {"scale": (D,)}
        if F:
            lp["pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"] = {"scale": (D,)}
            lp["mlp"] = {"gate_proj": dense(D, F, mb), "up_proj": dense(D, F, mb), "down_proj": dense(F, D, mb)}
            if sandwich:
                lp["post_feedforward_layernorm"] = {"scale": (D,)}
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


def decoder_layout(name: str, qk_norm: bool = False, sandwich_norms: bool = False, **kw) -> Layout:
    """The `Layout` of a Llama-like family (HF module names; no GGUF names): Llama's linears, its
    input norm, q/k norms over head_dim (role ``fixed``) when `qk_norm`, and either Llama's
    post_attention_layernorm (the MLP's input norm) or, with `sandwich_norms` (Gemma), a norm
    before and after each sublayer."""
    linears = tuple(dataclasses.replace(l, gguf=None) for l in _llama_linears())
    norms = [Norm(("input_layernorm",), "attn")]
    if qk_norm:
        norms += [Norm(("self_attn", "q_norm"), "attn", role="fixed"),
                  Norm(("self_attn", "k_norm"), "attn", role="fixed")]
    if sandwich_norms:
        norms += [Norm(("post_attention_layernorm",), "attn", position="post"),
                  Norm(("pre_feedforward_layernorm",), "mlp"),
                  Norm(("post_feedforward_layernorm",), "mlp", position="post")]
    else:
        norms += [Norm(("post_attention_layernorm",), "mlp")]
    return register(Layout(
        name=name, linears=linears, norms=tuple(norms),
        top={"embed_tokens": ("vocab", "hidden"), "norm": ("hidden",), "lm_head": ("hidden", "vocab")},
        embeddings=("embed_tokens", "lm_head"), hf_prefix="model.",
        config_widths={"heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                       "ffn": "intermediate_size"},
        **kw))


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
