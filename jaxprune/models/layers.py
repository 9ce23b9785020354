"""Building blocks shared by the model families: gated norms, RoPE, causal attention.

All computations that decide quality (norm statistics, softmax) run in float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _kept(hidden_gate, x):
    """(mask of kept hidden dims broadcastable to x, number kept) or (None, dim)."""
    if hidden_gate is None:
        return None, x.shape[-1]
    keep = (hidden_gate != 0).astype(jnp.float32)
    return keep, jnp.maximum(keep.sum(), 1.0)


class RMSNorm(nn.Module):
    """Llama RMSNorm; with a hidden gate the mean square runs over kept dims only.

    `offset`: multiply by ``offset + scale`` in float32 (Gemma stores ``w`` and uses ``1 + w``).
    """

    eps: float = 1e-6
    offset: float = 0.0

    @nn.compact
    def __call__(self, x, hidden_gate=None):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        if self.offset:
            scale = self.offset + scale.astype(jnp.float32)
        xf = x.astype(jnp.float32)
        keep, n = _kept(hidden_gate, xf)
        if keep is not None:
            xf = xf * keep
        var = jnp.sum(xf * xf, axis=-1, keepdims=True) / n
        y = xf * jax.lax.rsqrt(var + self.eps)
        return (y * scale).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm; with a hidden gate mean and variance run over kept dims only."""

    eps: float = 1e-5
    affine: bool = True

    @nn.compact
    def __call__(self, x, hidden_gate=None):
        xf = x.astype(jnp.float32)
        keep, n = _kept(hidden_gate, xf)
        if keep is not None:
            xf = xf * keep
        mean = jnp.sum(xf, axis=-1, keepdims=True) / n
        centred = xf - mean
        if keep is not None:
            centred = centred * keep
        var = jnp.sum(centred * centred, axis=-1, keepdims=True) / n
        y = centred * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (x.shape[-1],))
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        if keep is not None:
            y = y * keep
        return y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None):
    """RoPE inverse frequencies, with the `linear` and `llama3` scaling rules."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv


def rope_tables(positions, inv_freq):
    """cos/sin tables [..., head_dim] for integer positions [T] or [B, T] (HF's half-split layout)."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """Rotate x [B, T, H, Dh] by the tables [T, Dh] or per row [B, T, Dh] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = (t[None, :, None, :] if t.ndim == 2 else t[:, :, None, :] for t in (cos, sin))
    return (x * cos + rotated * sin).astype(x.dtype)


def attend_with_cache(q, k, v, cache: dict, scale: float, window: int | None = None,
                      softcap: float | None = None, expand=None):
    """Attention of new queries through a fixed-size KV cache: (output [B, T, H, Dh], new cache).

    cache: ``{"k": [B, S, KV, Dh], "v": [B, S, KV, Dh], "pos": int32 [B]}`` (see
    `jaxprune.generation.kv_cache`). Two cases, told apart by the static T:

    - T > 1 is the *prefill*: k, v are written to slots 0..T-1 of every row (rows padded on
      the right write junk past their length, which later tokens overwrite before any query
      sees it) and attention is the ordinary causal one (`causal_attention`).
    - T == 1 is one *decoding step*: row b's k, v go to slot ``pos[b]`` and its query sees
      slots ``<= pos[b]`` (within `window`, if any).

    expand: optional function mapping cached K/V heads to the heads the queries use (unequal
    K/V groups after compaction); by default H / KV query heads share each cached head.
    """
    B, T, H, Dh = q.shape
    ck, cv = cache["k"], cache["v"]
    if T > 1:
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, 0, 0))
        if expand is not None:
            k, v = expand(k), expand(v)
        o = causal_attention(q, k, v, scale, window=window, softcap=softcap)
        return o, {**cache, "k": ck, "v": cv}
    pos = cache["pos"]
    rows = jnp.arange(B)
    ck = ck.at[rows, pos].set(k[:, 0].astype(ck.dtype))
    cv = cv.at[rows, pos].set(v[:, 0].astype(cv.dtype))
    keys, values = (ck, cv) if expand is None else (expand(ck), expand(cv))
    KV = keys.shape[2]
    G = H // KV
    qg = (q[:, 0] * jnp.asarray(scale, q.dtype)).reshape(B, KV, G, Dh)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    slot = jnp.arange(keys.shape[1])
    visible = slot[None, :] <= pos[:, None]
    if window is not None:
        visible = visible & (pos[:, None] - slot[None, :] < window)
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), values.astype(v.dtype), preferred_element_type=jnp.float32)
    o = (o / jnp.sum(p, axis=-1, keepdims=True)).astype(v.dtype)
    return o.reshape(B, 1, H, Dh), {**cache, "k": ck, "v": cv}


def causal_attention(q, k, v, scale: float, chunk: int = 128, window: int | None = None,
                     softcap: float | None = None):
    """Causal grouped-query attention, optionally windowed and soft-capped.

    q: [B, T, H, Dh]; k, v: [B, T, KV, Dh] with H a multiple of KV. Returns [B, T, H, Dh].

    The G = H / KV query heads that share a K/V head are stacked as extra rows of
    one matmul (K/V are never repeated), and queries run in chunks of `chunk`
    positions that only see keys up to their own end, so the fully masked upper
    triangle is never computed. Softmax runs in float32 and is normalised after
    the value product (one division per output instead of per score).

    window (static): a query at position t sees the keys in (t - window, t] (sliding-window
    attention); each chunk also starts its keys at the first one its first query sees, so key
    blocks wholly before the window are never computed either.
    softcap: scores become ``tanh(s / softcap) * softcap`` before masking (Gemma 2).
    """
    B, T, H, Dh = q.shape
    KV = k.shape[2]
    G = H // KV
    kh = k.transpose(0, 2, 1, 3)  # [B, KV, T, Dh]
    vh = v.transpose(0, 2, 1, 3)
    q = q * jnp.asarray(scale, q.dtype)
    outs = []
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        n = c1 - c0
        k0 = 0 if window is None else max(0, c0 - window + 1)  # first key any query of the chunk sees
        qc = q[:, c0:c1].reshape(B, n, KV, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * n, Dh)
        s = jnp.einsum("bkqd,bksd->bkqs", qc, kh[:, :, k0:c1], preferred_element_type=jnp.float32)
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        row_pos = jnp.tile(jnp.arange(c0, c1), G)
        col_pos = jnp.arange(k0, c1)
        visible = row_pos[:, None] >= col_pos[None, :]
        if window is not None:
            visible = visible & (row_pos[:, None] - col_pos[None, :] < window)
        s = jnp.where(visible, s, -jnp.inf)
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vh[:, :, k0:c1], preferred_element_type=jnp.float32)
        o = (o / jnp.sum(p, axis=-1, keepdims=True)).astype(v.dtype)
        outs.append(o.reshape(B, KV, G, n, Dh).transpose(0, 3, 1, 2, 4).reshape(B, n, H, Dh))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
