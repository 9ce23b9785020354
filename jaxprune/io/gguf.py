"""GGUF files of Llama-family models -> `Params` and a tokenizer.

Weights are dequantized in numpy with the `gguf` package. llama.cpp's converter
permutes the rows of Q and K (interleaved rotary layout); we undo that so the
weights match Hugging Face's rotate-half layout that our RoPE uses.

RoPE scaling: Llama 3.1 / 3.2's "llama3" scaling is stored as a `rope_freqs.weight`
tensor of per-frequency divisors, from which `llama3_rope_from_factors` recovers
the HF `rope_scaling` (see there); linear scaling comes from the
`llama.rope.scaling.type` / `.factor` metadata.

Example:
    >>> params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
    >>> params.config.num_key_value_heads                       # doctest: +SKIP
    3
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from jaxprune.models.config import LlamaConfig, freeze
from jaxprune.errors import CheckpointError, UnsupportedModelError
from jaxprune.core.params import Params
from jaxprune.models.layout import layout_of

def gguf_names(arch: str = "llama") -> tuple[dict, dict]:
    """(name inside ``blk.N`` -> HF module path in a layer, top-level GGUF name -> HF module name),
    read from the family's `Layout` (its linears' and norms' `gguf` names and `gguf_top`).

    Example:
        >>> layer, top = gguf_names()
        >>> layer["attn_q"], layer["ffn_norm"], top["token_embd"]
        ('self_attn.q_proj', 'post_attention_layernorm', 'model.embed_tokens')
    """
    from jaxprune.io.names import path_to_hf
    lay = layout_of(arch)
    layer = {x.gguf: ".".join(x.path) for x in lay.linears + lay.norms if x.gguf}
    leaf = {k: ("embedding" if roles[0] == "vocab" else "kernel" if len(roles) == 2 else "scale")
            for k, roles in lay.top.items()}
    top = {g: path_to_hf((k, leaf[k]), arch).rsplit(".", 1)[0] for g, k in lay.gguf_top.items()}
    return layer, top


def _reader(path: str):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/struct.error/IndexError/...
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face tensor name for a llama.cpp tensor name (None if not a weight we keep)."""
    layer_names, top_names = gguf_names()
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        sub = layer_names.get(m.group(2))
        return f"model.layers.{m.group(1)}.{sub}.{m.group(3)}" if sub else None
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in top_names:
        return f"{top_names[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation of an HF-layout `[out, in]` weight."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, old_ctx: float) -> np.ndarray:
    """The divisors llama.cpp's converter writes as `rope_freqs.weight` for HF's llama3 scaling:
    1 above the high-frequency cut, `factor` below the low one, the smooth blend between."""
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blend = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blend))


def llama3_rope_from_factors(factors, head_dim: int, theta: float, original_ctx: float | None = None,
                             rtol: float = 1e-5) -> dict | None:
    """HF `rope_scaling` whose RoPE frequencies equal a GGUF's `rope_freqs` divisors, or raise.

    llama.cpp rotates pair i by `pos * theta**(-2i/d) / factors[i]`. Its converter computes those
    divisors from HF's llama3 scaling (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) and writes no metadata for them, so the tensor is the only
    record; it is also what llama.cpp runs, and the converter may compute it from the top-level
    `original_max_position_embeddings` (default 8192) rather than rope_scaling's. So the
    parameters are recovered from the tensor and accepted only if they reproduce it: the largest
    divisor is the factor; the blended divisors, affine in 1 / wavelength, give the two
    wavelength cuts (original_ctx / low and original_ctx / high), which is all the divisors
    depend on. Written as `original_ctx` (when given, e.g. from
    `llama.rope.scaling.original_context_length`) and the matching low/high, else as Llama 3's
    own low 1, high 4 and the rounded low cut or 8192 when those reproduce the tensor (the cuts
    are not unique when few divisors are blended), else low_freq_factor = 1 and
    original_ctx = the low cut.
    All divisors 1: None (no scaling); all equal: linear scaling.

    Raises UnsupportedModelError when the divisors are not finite and positive, have the wrong
    length, or no llama3 parameters reproduce them within `rtol`.
    """
    d = np.asarray(factors, np.float64).reshape(-1)
    if d.shape[0] != head_dim // 2 or not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise UnsupportedModelError(f"rope_freqs must hold head_dim / 2 = {head_dim // 2} finite positive "
                                    f"divisors, got {d.shape[0]} values (min {d.min() if d.size else None})")
    if np.allclose(d, 1.0, rtol=0, atol=rtol):
        return None
    if np.allclose(d, d[0], rtol=rtol, atol=0):
        return {"rope_type": "linear", "factor": float(np.float32(d[0]))}
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)  # as the converter
    f = inv.astype(np.float64) / (2 * np.pi)  # 1 / wavelength, decreasing
    factor = float(np.float32(d.max()))
    ones, full = np.isclose(d, 1.0, rtol=0, atol=rtol), np.isclose(d, factor, rtol=rtol, atol=0)
    blend = ~ones & ~full
    s = (1 / d[blend] - 1 / factor) / (1 - 1 / factor)  # the smooth weight of each blended pair
    top = f[ones].min() if ones.any() else 2 * f[0]  # the high cut H lies below top ...
    bottom = f[full].max() if full.any() else 0.5 * f[-1]  # ... the low cut L above bottom
    if blend.sum() >= 2 and np.ptp(s) > 0:  # f = L + s (H - L)
        slope, lo = np.polyfit(s, f[blend], 1)
        hi = lo + slope
    elif blend.sum() == 1:  # one blended pair: H halfway (geometrically) to the next unscaled one
        hi = np.sqrt(f[blend][0] * top)
        lo = (f[blend][0] - s[0] * hi) / (1 - s[0])
    else:  # a jump from 1 to factor: both cuts in the gap
        mid = np.sqrt(top * bottom)
        lo, hi = mid * (bottom / mid) ** 0.5, mid * (top / mid) ** 0.5
    candidates = []
    if lo > 0 and hi > lo:
        if original_ctx:
            candidates.append((float(original_ctx) * lo, float(original_ctx) * hi, float(original_ctx)))
        ctx = 1 / lo
        candidates += [(1.0, 4.0, float(round(ctx))), (1.0, 4.0, 8192.0),  # Llama 3's own values first
                       (1.0, round(hi / lo, 6), float(round(ctx))), (1.0, hi / lo, ctx)]
    for low, high, ctx in candidates:
        if np.allclose(_llama3_factors(inv.astype(np.float64), factor, low, high, ctx), d, rtol=rtol, atol=0):
            ctx = float(ctx)
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                    "high_freq_factor": float(high), "original_max_position_embeddings": int(ctx) if ctx.is_integer() else ctx}
    raise UnsupportedModelError(f"rope_freqs divisors {np.round(d, 4).tolist()} are not llama3 rope scaling "
                                "(no factor / low_freq_factor / high_freq_factor / original context reproduces them)")


def _rope_scaling(path: str, reader, head_dim: int, theta: float) -> dict | None:
    """HF-style rope_scaling of a GGUF: llama3 from `rope_freqs.weight`, linear from metadata."""
    g = lambda k: _field(reader, f"llama.rope.scaling.{k}")
    kind = g("type") or ("linear" if _field(reader, "llama.rope.scale_linear") else "none")
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if kind not in ("none", "linear"):
        raise UnsupportedModelError(f"{path}: GGUF rope scaling type {kind!r} is not supported (none, linear, "
                                    "and llama3 as a rope_freqs tensor are)")
    if kind == "linear":
        factor = float(g("factor") or _field(reader, "llama.rope.scale_linear") or 1.0)
        if freqs:
            raise UnsupportedModelError(f"{path}: GGUF has both linear rope scaling and rope_freqs; not supported")
        return {"rope_type": "linear", "factor": factor} if factor != 1.0 else None
    if not freqs:
        return None
    import gguf

    try:
        factors = gguf.quants.dequantize(freqs[0].data, freqs[0].tensor_type)  # F32 as the converter writes it
    except Exception as e:
        raise CheckpointError(f"{path}: tensor rope_freqs.weight could not be read ({type(e).__name__}: {e})") from None
    try:
        return llama3_rope_from_factors(factors, head_dim, theta, g("original_context_length"))
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None


def gguf_config(path: str, reader=None) -> LlamaConfig:
    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported (jaxprune reads 'llama')")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)
    try:
        heads = int(g("attention.head_count"))
        hidden = int(g("embedding_length"))
        n_vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        tied = not any(t.name == "output.weight" for t in reader.tensors)
        head_dim = int(g("rope.dimension_count", hidden // heads))
        theta = float(g("rope.freq_base", 10000.0))
        rope = _rope_scaling(path, reader, head_dim, theta)
        return LlamaConfig(
            vocab_size=int(n_vocab), hidden_size=hidden,
            intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
            num_attention_heads=heads, num_key_value_heads=int(g("attention.head_count_kv", heads)),
            head_dim_override=head_dim if head_dim != hidden // heads else None,
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta, rope_scaling=freeze(rope),
            max_position_embeddings=int(g("context_length", 2048)), tie_word_embeddings=tied,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        )
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: GGUF metadata is incomplete ({e})") from None


def load_gguf(path: str, dtype=jnp.float32) -> Params:
    """Load and dequantize a Llama-family GGUF file into `Params` (HF layout, Q/K un-permuted)."""
    import gguf
    from jaxprune.io.hf import from_named_arrays

    reader = _reader(path)
    config = gguf_config(path, reader)
    named = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {t.name} could not be dequantized "
                                  f"({type(e).__name__}: {e}); the file may be truncated") from None
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, config.num_key_value_heads)
        named[name] = w
    return from_named_arrays(config, named, source=path, dtype=dtype)


def gguf_vocab(path: str) -> dict:
    """Tokens, merges, token types and special ids of a GGUF file's BPE vocabulary."""
    reader = _reader(path)
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedModelError(f"{path}: GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' is)")
    return {
        "tokens": _field(reader, "tokenizer.ggml.tokens"),
        "merges": _field(reader, "tokenizer.ggml.merges") or [],
        "token_types": _field(reader, "tokenizer.ggml.token_type"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "add_space_prefix": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
    }
