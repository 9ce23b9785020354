"""GGUF files of Llama-family models -> `Params` and a tokenizer.

Architectures ``llama`` (one width for all layers) and ``deci`` (llama.cpp's per-layer head,
K/V head and FFN-width arrays, 0 = sublayer absent; read into `LlamaConfig.layer_shapes`).
Files jaxprune wrote (`jaxprune.io.gguf_export`) carry their exact config in `CONFIG_KEY`;
reading undoes the placeholders the writer adds for llama.cpp's quirks (`gguf_layers`).

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
    from jaxprune.io.gguf_check import check_gguf

    check_gguf(path)   # every count and length bounded by the file before the gguf package reads it
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


def _rope_scaling(path: str, reader, head_dim: int, theta: float, arch: str = "llama") -> dict | None:
    """HF-style rope_scaling of a GGUF: llama3 from `rope_freqs.weight`, linear from metadata."""
    g = lambda k: _field(reader, f"{arch}.rope.scaling.{k}")
    kind = g("type") or ("linear" if _field(reader, f"{arch}.rope.scale_linear") else "none")
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if kind not in ("none", "linear"):
        raise UnsupportedModelError(f"{path}: GGUF rope scaling type {kind!r} is not supported (none, linear, "
                                    "and llama3 as a rope_freqs tensor are)")
    if kind == "linear":
        factor = float(g("factor") or _field(reader, f"{arch}.rope.scale_linear") or 1.0)
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


def gguf_layers(config: LlamaConfig) -> list[dict]:
    """Per layer, what a GGUF file written by jaxprune holds for `config`, working around three
    quirks of llama.cpp's ``deci`` graph (llama-cpp-python 0.3.36) while keeping the outputs exact:

    * A layer with ``feed_forward_length`` 0 skips to the next layer before taking its own output,
      so an attention sublayer there would be dropped: every FFN-free layer gets an FFN of width 1
      with all-zero weights (``ffn_placeholder``; it adds exactly 0).
    * The head size is derived only when layer 0 has heads: when layer 0 has no attention but
      another layer does, layer 0 gets 1 query / 1 K/V head with all-zero weights
      (``attn_placeholder``; its zero ``o_proj`` adds exactly 0).
    * Unequal K/V groups (``kv_groups``) cannot be written: K/V rows are repeated to one K/V head
      per query head (``n_kv = n_heads``), which is exact. (``n_kv = 0 < n_heads`` would mean
      deci's "linear attention", so it is never written.)

    Each entry: the written ``n_heads``, ``n_kv``, ``ffn_dim``, the two placeholder flags and the
    ``kv_groups`` that were expanded (None). `load_gguf` undoes all three for files that carry
    `CONFIG_KEY`.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
        ...                   num_attention_heads=2, layer_shapes=freeze([
        ...                       {"n_heads": 0, "n_kv": 0, "ffn_dim": 8},
        ...                       {"n_heads": 2, "n_kv": 2, "ffn_dim": 0}]))
        >>> [(e["n_heads"], e["n_kv"], e["ffn_dim"]) for e in gguf_layers(cfg)]
        [(1, 1, 8), (2, 2, 1)]
    """
    from jaxprune.models.llama import per_layer_dims
    dims = per_layer_dims(config)
    any_attention = any(d["n_heads"] for d in dims)
    out = []
    for i, d in enumerate(dims):
        groups = tuple(d["kv_groups"]) if d.get("kv_groups") and d["n_heads"] else None
        e = {"n_heads": d["n_heads"], "n_kv": d["n_heads"] if groups else d["n_kv"], "ffn_dim": d["ffn_dim"],
             "kv_groups": groups, "attn_placeholder": False, "ffn_placeholder": False}
        if i == 0 and not d["n_heads"] and any_attention:
            e.update(n_heads=1, n_kv=1, attn_placeholder=True)
        if not d["ffn_dim"]:
            e.update(ffn_dim=1, ffn_placeholder=True)
        out.append(e)
    return out


CONFIG_KEY = "jaxprune.config"  # JSON of `config.to_hf()`, written by `jaxprune.io.gguf_export`


def _per_layer(path: str, value, n: int, key: str) -> list[int]:
    """A per-layer GGUF value (one number for all layers, or an array of `n`) as `n` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise CheckpointError(f"{path}: {key} has {len(value)} entries for block_count={n}")
        return [int(v) for v in value]
    return [int(value)] * n


def _layer_counts(path: str, reader, arch: str, n_layers: int) -> tuple[list, list, list]:
    """(query heads, K/V heads, FFN width) of each layer as the file states them."""
    g = lambda k: _field(reader, f"{arch}.{k}")
    heads = _per_layer(path, g("attention.head_count"), n_layers, "attention.head_count")
    kv = g("attention.head_count_kv")
    kv = heads if kv is None else _per_layer(path, kv, n_layers, "attention.head_count_kv")
    ffn = _per_layer(path, g("feed_forward_length"), n_layers, "feed_forward_length")
    return heads, kv, ffn


def _file_config(path: str, reader, arch: str) -> LlamaConfig:
    """The config a llama / deci GGUF states (per-layer arrays -> `layer_shapes` when layers differ)."""
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)
    try:
        n_layers = int(g("block_count"))
        hidden = int(g("embedding_length"))
        heads, kvs, ffns = _layer_counts(path, reader, arch, n_layers)
        for i, (h, kv) in enumerate(zip(heads, kvs)):
            if h and not kv:
                raise UnsupportedModelError(f"{path}: layer {i} has {h} heads and no K/V heads (deci's linear "
                                            "attention), which jaxprune does not implement")
            if h and h % kv:
                raise UnsupportedModelError(f"{path}: layer {i} has {h} heads, not a multiple of its {kv} K/V heads")
        top = max(heads) if any(heads) else 1
        top_kv = next((kv for h, kv in zip(heads, kvs) if h == top), 1)
        n_vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        tied = not any(t.name == "output.weight" for t in reader.tensors)
        head_dim = int(g("rope.dimension_count") or g("attention.key_length") or hidden // top)
        theta = float(g("rope.freq_base", 10000.0))
        rope = _rope_scaling(path, reader, head_dim, theta, arch)
        uniform = all(h == heads[0] and kv == kvs[0] and f == ffns[0] and h and f
                      for h, kv, f in zip(heads, kvs, ffns))
        shapes = None if uniform else freeze([{"n_heads": h, "n_kv": kv if h else 0, "ffn_dim": f}
                                              for h, kv, f in zip(heads, kvs, ffns)])
        return LlamaConfig(
            vocab_size=int(n_vocab), hidden_size=hidden,
            intermediate_size=max(ffns) if ffns else 0, num_hidden_layers=n_layers,
            num_attention_heads=top, num_key_value_heads=top_kv,
            head_dim_override=head_dim if head_dim != hidden // top else None,
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta, rope_scaling=freeze(rope),
            max_position_embeddings=int(g("context_length", 2048)), tie_word_embeddings=tied,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            layer_shapes=shapes,
        )
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: GGUF metadata is incomplete ({e})") from None


def _our_config(path: str, reader, stated: LlamaConfig) -> LlamaConfig | None:
    """The exact config jaxprune wrote into `CONFIG_KEY` (None if absent), checked against what the
    file states: GGUF keeps floats as float32, loses the top-level widths of a non-uniform model and
    holds the placeholders of `gguf_layers`, so only this key restores the config exactly."""
    from jaxprune.io.hf import checked_config
    from jaxprune.io.untrusted import parse_json
    from jaxprune.models.layers import rope_inv_freq
    from jaxprune.models.llama import per_layer_dims

    text = _field(reader, CONFIG_KEY)
    if text is None:
        return None
    if not isinstance(text, str):
        raise CheckpointError(f"{path}: metadata {CONFIG_KEY} is not a string")
    ours = checked_config(parse_json(text.encode(), path, CONFIG_KEY, 32), f"{path}: {CONFIG_KEY}")
    f32 = lambda x: float(np.float32(x))
    written = [(e["n_heads"], e["n_kv"], e["ffn_dim"]) for e in gguf_layers(ours)] if ours.arch == "llama" else []
    checks = [
        ("arch", ours.arch, "llama"),
        ("vocab_size", ours.vocab_size, stated.vocab_size),
        ("hidden_size", ours.hidden_size, stated.hidden_size),
        ("num_hidden_layers", ours.num_hidden_layers, stated.num_hidden_layers),
        ("head_dim", ours.head_dim, stated.head_dim),
        ("tie_word_embeddings", ours.tie_word_embeddings, stated.tie_word_embeddings),
        ("max_position_embeddings", ours.max_position_embeddings, stated.max_position_embeddings),
        ("rms_norm_eps", f32(ours.rms_norm_eps), f32(stated.rms_norm_eps)),
        ("rope_theta", f32(ours.rope_theta), f32(stated.rope_theta)),
        ("layer widths", written, [(d["n_heads"], d["n_kv"], d["ffn_dim"]) for d in per_layer_dims(stated)]),
    ]
    bad = [f"{name}: {a!r} there, {b!r} in the file" for name, a, b in checks if a != b]
    if not bad and not np.allclose(np.asarray(rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope)),
                                   np.asarray(rope_inv_freq(stated.head_dim, stated.rope_theta, stated.rope)),
                                   rtol=1e-5, atol=0):
        bad.append(f"rope scaling: {ours.rope} there, {stated.rope} in the file")
    if bad:
        raise CheckpointError(f"{path}: metadata {CONFIG_KEY} disagrees with the file's own metadata (changed "
                              "after jaxprune wrote it?): " + "; ".join(bad))
    return ours


def _arch(path: str, reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "deci"):
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    "(jaxprune reads 'llama' and 'deci')")
    return arch


def gguf_config(path: str, reader=None) -> LlamaConfig:
    """The `LlamaConfig` of a ``llama`` or ``deci`` GGUF file: per-layer head, K/V head and FFN
    arrays (0: sublayer absent) become `layer_shapes`; a file jaxprune wrote gives back the exact
    config it was written from (`CONFIG_KEY`)."""
    reader = reader or _reader(path)
    stated = _file_config(path, reader, _arch(path, reader))
    return _our_config(path, reader, stated) or stated


def _undo_placeholders(path: str, named: dict, config: LlamaConfig) -> None:
    """Drop `gguf_layers`' placeholder sublayers and un-repeat expanded K/V rows, in place."""
    for i, e in enumerate(gguf_layers(config)):
        pre = f"model.layers.{i}."
        for flag, keys in (("attn_placeholder", ("self_attn.", "input_layernorm.")),
                           ("ffn_placeholder", ("mlp.", "post_attention_layernorm."))):
            if not e[flag]:
                continue
            for name in [n for n in named if n.startswith(tuple(pre + k for k in keys))]:
                w = named.pop(name)
                if not name.endswith("layernorm.weight") and np.any(w):
                    raise CheckpointError(f"{path}: {name} is a placeholder jaxprune writes as zeros, but "
                                          "holds other values (changed after jaxprune wrote it?)")
        if e["kv_groups"]:
            starts = np.cumsum((0,) + e["kv_groups"][:-1])
            for proj in ("k_proj", "v_proj"):
                name = f"{pre}self_attn.{proj}.weight"
                if name not in named:
                    continue
                w = named[name]
                per_head = w.reshape(e["n_heads"], -1, w.shape[-1])
                kept = per_head[starts]
                if not np.array_equal(np.repeat(kept, e["kv_groups"], axis=0), per_head):
                    raise CheckpointError(f"{path}: {name}: the K/V rows jaxprune repeats per query head "
                                          "differ within a group (changed after jaxprune wrote it?)")
                named[name] = kept.reshape(-1, w.shape[-1])


def load_gguf(path: str, dtype=jnp.float32) -> Params:
    """Load and dequantize a ``llama`` or ``deci`` GGUF file into `Params` (HF layout, Q/K un-permuted)."""
    import gguf
    from jaxprune.io.hf import from_named_arrays

    reader = _reader(path)
    arch = _arch(path, reader)
    stated = _file_config(path, reader, arch)
    ours = _our_config(path, reader, stated)
    heads, kvs, _ = _layer_counts(path, reader, arch, stated.num_hidden_layers)
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
        i = int(t.name.split(".")[1]) if t.name.startswith("blk.") else None
        if i is not None and i >= len(heads):
            raise CheckpointError(f"{path}: tensor {t.name} names a layer beyond block_count={len(heads)}")
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, heads[i])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, kvs[i])
        named[name] = w
    if ours is not None:
        _undo_placeholders(path, named, ours)
    return from_named_arrays(ours or stated, named, source=path, dtype=dtype)


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
