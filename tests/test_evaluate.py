"""Perplexity against an NLL computed here from transformers' logits."""

from __future__ import annotations

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.models.config import config_from_hf
from jaxprune.io.hf import from_named_arrays

from conftest import hf_to_named, tiny_llama, torch_logits


def reference_perplexity(model, windows):
    logits = torch_logits(model, windows).astype(np.float64)[:, :-1]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1)
    return float(np.exp(nll.mean()))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_matches_reference_for_any_batching(batch_size):
    model = tiny_llama()
    params = from_named_arrays(config_from_hf(model.config.to_dict()), hf_to_named(model))
    windows = np.random.default_rng(0).integers(0, 101, (7, 33)).astype(np.int32)
    got = jp.perplexity(params, windows, seqlen=33, batch_size=batch_size)
    assert got == pytest.approx(reference_perplexity(model, windows), rel=1e-5)


def test_perplexity_rejects_bad_windows():
    import jax
    cfg = jp.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    params = jp.init(cfg, jax.random.key(0))
    ok = np.zeros((2, 8), np.int32)
    with pytest.raises(jp.InvalidArgumentError, match="seqlen=16"):
        jp.perplexity(params, ok, seqlen=16)
    with pytest.raises(jp.InvalidArgumentError, match=r"lie in \[0, 50\)"):
        jp.perplexity(params, ok + 60)
    with pytest.raises(jp.InvalidArgumentError, match="integer token ids"):
        jp.perplexity(params, ok.astype(np.float32))
    with pytest.raises(jp.InvalidArgumentError, match="shape"):
        jp.perplexity(params, np.zeros((0, 8), np.int32))
