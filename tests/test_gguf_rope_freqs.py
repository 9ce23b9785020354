"""Llama 3.1 / 3.2 GGUF files: the `rope_freqs.weight` tensor becomes the HF llama3 rope scaling.

A tiny Llama 3.1-style model is saved as an HF directory and written as GGUF the way llama.cpp's
converter (convert_hf_to_gguf.py, LlamaModel) lays it out: the llama metadata, Q/K rows permuted
to the interleaved rotary layout, F32 tensors, and `rope_freqs.weight` = per-frequency divisors
computed from the llama3 parameters (`converter_rope_factors`, the converter's loop in numpy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import jaxprune as jp
from jaxprune.errors import UnsupportedModelError
from jaxprune.io import gguf as G
from jaxprune.models.layers import rope_inv_freq

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}


def converter_rope_factors(head_dim, theta, rope, old_context_len):
    """The converter's `rope_freqs` (float32 freqs, per-frequency branches)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high:
            out.append(1)
        elif wavelen > old_context_len / low:
            out.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def permute(w, n_head):
    """llama.cpp's converter: HF rotate-half Q/K rows -> interleaved (inverse of G.unpermute_rotary)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path, cfg, state, rope_freqs=None, extra=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    w.add_token_merges([])
    for key, value in (extra or {}).items():
        getattr(w, key)(value)
    if rope_freqs is not None:  # the converter's extra tensors come first
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, name in GGUF_NAMES.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = permute(t, cfg.num_attention_heads)
            elif name == "attn_k":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    """(HF directory, GGUF with rope_freqs, GGUF without, transformers model, config)."""
    torch.manual_seed(0)
    # `original_max_position_embeddings` also at the top level: the converter computes the
    # divisors from hparams["original_max_position_embeddings"] (default 8192, Llama 3.x's value)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rope_scaling=dict(ROPE),
        original_max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float32",
        initializer_range=0.15)  # sharp attention, so that RoPE matters
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a wrong layout shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    d = tmp_path_factory.mktemp("llama31")
    model.save_pretrained(d / "hf", safe_serialization=True)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    factors = converter_rope_factors(16, 10000.0, ROPE, 64)
    assert 1 < factors.max() and (factors == 1).any() and ((factors > 1) & (factors < 8)).sum() >= 2
    write_gguf(d / "model.gguf", cfg, state, factors)
    write_gguf(d / "no_rope_freqs.gguf", cfg, state)
    return d / "hf", d / "model.gguf", d / "no_rope_freqs.gguf", model, cfg


def test_gguf_rope_freqs_logits_equal_hf_and_transformers(llama31):
    hf_dir, path, plain, model, cfg = llama31
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 128)).astype(np.int32)  # > 64
    from_gguf, from_hf = jp.load(str(path)), jp.load(str(hf_dir))
    assert from_gguf.config.rope == ROPE == from_hf.config.rope
    a = np.asarray(jp.forward(from_gguf, tokens))
    b = np.asarray(jp.forward(from_hf, tokens))
    assert np.abs(a - b).max() <= 1e-4
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(a - ref).max() <= 1e-4
    # the same file without rope_freqs (plain RoPE) gives other logits: the comparison can fail
    c = np.asarray(jp.forward(jp.load(str(plain)), tokens))
    assert jp.load(str(plain)).config.rope is None
    assert np.abs(c - ref).max() > 1e-2


@pytest.mark.parametrize("head_dim,theta,rope", [
    (128, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),  # Llama 3.1 8B
    (64, 500000.0, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),  # Llama 3.2 1B
    (16, 10000.0, dict(ROPE)),
    (8, 10000.0, dict(ROPE)),  # a single blended divisor: the cuts are not unique; Llama 3's values win
])
def test_llama3_parameters_are_recovered_from_the_divisors(head_dim, theta, rope):
    rope = {"rope_type": "llama3", **rope}
    factors = converter_rope_factors(head_dim, theta, rope, rope["original_max_position_embeddings"])
    got = G.llama3_rope_from_factors(factors, head_dim, theta)
    assert got == rope
    np.testing.assert_array_equal(np.asarray(rope_inv_freq(head_dim, theta, got)),
                                  np.asarray(rope_inv_freq(head_dim, theta, rope)))


def test_other_llama3_parameters_give_the_same_frequencies():
    """low/high/original context are not unique (only original / low and original / high matter):
    whatever is recovered, the RoPE frequencies are the same."""
    for rope in ({"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0, "original_max_position_embeddings": 100},
                 {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0, "original_max_position_embeddings": 4096}):
        rope = {"rope_type": "llama3", **rope}
        factors = converter_rope_factors(64, 500000.0, rope, rope["original_max_position_embeddings"])
        got = G.llama3_rope_from_factors(factors, 64, 500000.0)
        np.testing.assert_allclose(np.asarray(rope_inv_freq(64, 500000.0, got)),
                                   np.asarray(rope_inv_freq(64, 500000.0, rope)), rtol=1e-6)


def test_trivial_and_inconsistent_divisors():
    assert G.llama3_rope_from_factors(np.ones(8), 16, 10000.0) is None
    assert G.llama3_rope_from_factors(np.full(8, 2.0), 16, 10000.0) == {"rope_type": "linear", "factor": 2.0}
    for bad, match in [(np.ones(7), "head_dim / 2"), (np.array([1, 1, 2, np.nan, 8, 8, 8, 8.]), "finite"),
                       (np.array([1, 3, 2, 8, 1, 8, 8, 8.]), "not llama3"), (np.array([1, 1, 1, 1, 1, 1, 0, 8.]), "positive")]:
        with pytest.raises(UnsupportedModelError, match=match):
            G.llama3_rope_from_factors(bad, 16, 10000.0)


def test_gguf_with_inconsistent_rope_freqs_or_other_scaling_is_rejected(llama31, tmp_path):
    hf_dir, _, _, model, cfg = llama31
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    write_gguf(tmp_path / "bad.gguf", cfg, state, np.array([1, 3, 2, 8, 1, 8, 8, 8], np.float32))
    with pytest.raises(UnsupportedModelError, match="bad.gguf.*not llama3"):
        jp.load(str(tmp_path / "bad.gguf"))
    write_gguf(tmp_path / "yarn.gguf", cfg, state, extra={"add_rope_scaling_type": gguf.RopeScalingType.YARN})
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        G.gguf_config(str(tmp_path / "yarn.gguf"))
    write_gguf(tmp_path / "linear.gguf", cfg, state, extra={"add_rope_scaling_type": gguf.RopeScalingType.LINEAR,
                                                             "add_rope_scaling_factor": 2.0})
    assert G.gguf_config(str(tmp_path / "linear.gguf")).rope == {"rope_type": "linear", "factor": 2.0}
