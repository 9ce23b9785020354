"""OPT in Flax linen: learned positions (offset 2), LayerNorm, ReLU MLP, pre- or post-LN,
and `project_in`/`project_out` when `word_embed_proj_dim != hidden_size` (opt-350m).

In post-LN layers a sublayer gate `s` interpolates `s * LN(x + f(x)) + (1 - s) * x`,
so a removed sublayer (s = 0) is the identity exactly as in pre-LN layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.models.config import OPTConfig
from jaxprune.models import gates as G
from jaxprune.models.layers import LayerNorm, attend_with_cache, causal_attention
from jaxprune.models.layout import Layout, Linear, Norm, register

_ACT = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True)}


class OPTAttention(nn.Module):
    config: OPTConfig
    n_heads: int

    @nn.compact
    def __call__(self, x, g, cache=None):
        cfg, Dh = self.config, self.config.head_dim
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.enable_bias, name=name, dtype=x.dtype)
        B, T, _ = x.shape
        q = dense(self.n_heads * Dh, "q_proj")(x).reshape(B, T, self.n_heads, Dh)
        k = dense(self.n_heads * Dh, "k_proj")(x).reshape(B, T, self.n_heads, Dh)
        v = dense(self.n_heads * Dh, "v_proj")(x).reshape(B, T, self.n_heads, Dh)
        if cache is None:
            o = causal_attention(q, k, v, Dh ** -0.5)
        else:
            o, cache = attend_with_cache(q, k, v, cache, Dh ** -0.5)
        m = G.head_multiplier(g, self.n_heads, self.n_heads, o.dtype)
        if m is not None:
            o = o * m[:, None]
        return dense(x.shape[-1], "out_proj")(o.reshape(B, T, self.n_heads * Dh)), cache


class OPTBlock(nn.Module):
    """One OPT decoder layer; absent sublayers (n_heads=0 / ffn_dim=0) are identity."""

    config: OPTConfig
    n_heads: int
    ffn_dim: int

    @nn.compact
    def __call__(self, x, g, cache=None):
        cfg = self.config
        hg = g.get("hidden")
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, cfg.layer_norm_elementwise_affine, name=name)
        if self.n_heads:
            attn = OPTAttention(cfg, self.n_heads, name="self_attn")
            out = {}

            def attend(h):
                o, out["cache"] = attn(h, g, cache)
                return o

            x = self._residual(x, attend, norm("self_attn_layer_norm"), G.sublayer_multiplier(g, "attn"), hg)
            cache = out["cache"]
        if self.ffn_dim:
            fc1 = nn.Dense(self.ffn_dim, use_bias=cfg.enable_bias, name="fc1", dtype=x.dtype)
            fc2 = nn.Dense(x.shape[-1], use_bias=cfg.enable_bias, name="fc2", dtype=x.dtype)

            def mlp(h):
                h = _ACT[cfg.activation_function](fc1(h))
                if "ffn" in g:
                    h = h * g["ffn"].astype(h.dtype)
                return fc2(h)

            x = self._residual(x, mlp, norm("final_layer_norm"), G.sublayer_multiplier(g, "mlp"), hg)
        return x, cache

    def _residual(self, x, f, norm, s, hg):
        if self.config.do_layer_norm_before:
            u = f(norm(x, hg))
            if s is not None:
                u = u * jnp.asarray(s, u.dtype)
            if hg is not None:
                u = u * hg.astype(u.dtype)
            return x + u
        u = f(x)
        if hg is not None:
            u = u * hg.astype(u.dtype)
        y = norm(x + u, hg)
        if s is None:
            return y
        s = jnp.asarray(s, y.dtype)
        return s * y + (1 - s) * x


def layer_dims(config: OPTConfig, lp: dict) -> dict:
    attn = lp.get("self_attn")
    return {"n_heads": attn["q_proj"]["kernel"].shape[1] // config.head_dim if attn else 0,
            "ffn_dim": lp["fc1"]["kernel"].shape[1] if "fc1" in lp else 0}


def embed(config: OPTConfig, tree: dict, tokens, gates: dict, positions=None):
    """tokens [B, T] (at `positions` [B, T], default ``arange(T)``) -> (hidden states, None)."""
    x = jnp.take(tree["embed_tokens"]["embedding"], tokens, axis=0)
    if "project_in" in tree:
        x = x @ tree["project_in"]["kernel"].astype(x.dtype)
    T = tokens.shape[-1]
    table = tree["embed_positions"]["embedding"]
    if positions is None:
        pos = table[config.position_offset:config.position_offset + T]
    else:
        pos = jnp.take(table, positions + config.position_offset, axis=0)
    x = x + pos.astype(x.dtype)
    if gates.get("hidden") is not None:
        x = x * gates["hidden"].astype(x.dtype)
    return x, None


def layer(config: OPTConfig, lp: dict, x, ctx, g: dict, kv_groups=None, cache: dict | None = None):
    """Decoder layer `lp` on x (OPT: one K/V head per query head); with a KV cache -> (x, cache)."""
    x, cache_out = OPTBlock(config, **layer_dims(config, lp)).apply({"params": lp}, x, g, cache)
    return x if cache is None else (x, cache_out)


def unembed(config: OPTConfig, tree: dict, x, gates: dict):
    if "final_layer_norm" in tree:
        x = LayerNorm(config.layer_norm_eps, config.layer_norm_elementwise_affine).apply(
            {"params": tree["final_layer_norm"]}, x, gates.get("hidden"))
    if "project_out" in tree:
        x = x @ tree["project_out"]["kernel"].astype(x.dtype)
    w = tree["embed_tokens"]["embedding"]
    return jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)


def shapes(config: OPTConfig) -> dict:
    """The shape of every parameter `config` implies, as a tree of tuples."""
    D, P, V = config.hidden_size, config.word_embed_proj_dim, config.vocab_size
    dense = lambda i, o: {"kernel": (i, o), **({"bias": (o,)} if config.enable_bias else {})}
    ln = lambda: {"scale": (D,), "bias": (D,)} if config.layer_norm_elementwise_affine else {}

    def one(dims):
        H, F = dims["n_heads"], dims["ffn_dim"]
        lp = {}
        if H:
            lp["self_attn_layer_norm"] = ln()
            HD = H * config.head_dim
            lp["self_attn"] = {"q_proj": dense(D, HD), "k_proj": dense(D, HD), "v_proj": dense(D, HD),
                               "out_proj": dense(HD, D)}
        if F:
            lp["final_layer_norm"] = ln()
            lp["fc1"], lp["fc2"] = dense(D, F), dense(F, D)
        return lp

    tree = {"embed_tokens": {"embedding": (V, P)},
            "embed_positions": {"embedding": (config.max_position_embeddings + config.position_offset, D)},
            "layers": [one(d) for d in per_layer_dims(config)]}
    if P != D:
        tree["project_in"] = {"kernel": (P, D)}
        tree["project_out"] = {"kernel": (D, P)}
    if config.has_final_layer_norm:
        tree["final_layer_norm"] = ln()
    return tree


def per_layer_dims(config: OPTConfig) -> list[dict]:
    if config.layer_shapes is not None:
        return [dict(d) for d in config.layer_shapes]
    return [{"n_heads": config.num_attention_heads, "ffn_dim": config.ffn_dim}] * config.num_hidden_layers


LAYOUT = register(Layout(
    name="opt",
    linears=(Linear(("self_attn", "q_proj"), "attn", ("hidden", "heads")),
             Linear(("self_attn", "k_proj"), "attn", ("hidden", "groups")),
             Linear(("self_attn", "v_proj"), "attn", ("hidden", "groups")),
             Linear(("self_attn", "out_proj"), "attn", ("heads", "hidden")),
             Linear(("fc1",), "mlp", ("hidden", "ffn")),
             Linear(("fc2",), "mlp", ("ffn", "hidden"))),
    norms=(Norm(("self_attn_layer_norm",), "attn"), Norm(("final_layer_norm",), "mlp")),
    top={"embed_tokens": ("vocab", "hidden"), "embed_positions": ("positions", "hidden"),
         "project_in": ("fixed", "hidden"), "project_out": ("hidden", "fixed"), "final_layer_norm": ("hidden",)},
    embeddings=("embed_tokens", "embed_positions", "lm_head"),
    hf_prefix="model.decoder.",
    hf_tied_head=True,
    config_widths={"heads": "num_attention_heads", "kv_heads": None, "ffn": "ffn_dim"},
))
