"""GGUF files of Llama-family models -> `Params` and a tokenizer.

Weights are dequantized in numpy with the `gguf` package. llama.cpp's converter
permutes the rows of Q and K (interleaved rotary layout); we undo that so the
weights match Hugging Face's rotate-half layout that our RoPE uses.

Example:
    >>> params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
    >>> params.config.num_key_value_heads                       # doctest: +SKIP
    3
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from jaxprune.models.config import LlamaConfig
from jaxprune.errors import CheckpointError, UnsupportedModelError
from jaxprune.core.params import Params

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


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
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        sub = _LAYER_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{sub}.{m.group(3)}" if sub else None
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation of an HF-layout `[out, in]` weight."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(path: str, reader=None) -> LlamaConfig:
    reader = reader or _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported (jaxprune reads 'llama')")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UnsupportedModelError(f"{path}: GGUF rope_freqs (llama3.1-style rope scaling) is not supported "
                                    "yet; load the Hugging Face checkpoint directory instead")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)
    try:
        heads = int(g("attention.head_count"))
        hidden = int(g("embedding_length"))
        n_vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        tied = not any(t.name == "output.weight" for t in reader.tensors)
        head_dim = int(g("rope.dimension_count", hidden // heads))
        return LlamaConfig(
            vocab_size=int(n_vocab), hidden_size=hidden,
            intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
            num_attention_heads=heads, num_key_value_heads=int(g("attention.head_count_kv", heads)),
            head_dim_override=head_dim if head_dim != hidden // heads else None,
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g("rope.freq_base", 10000.0)),
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
