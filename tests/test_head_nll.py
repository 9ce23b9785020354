"""`head_nll` (the LM head a chunk of positions at a time) against float64 numpy on the full logits,
and the CPU calibration batch size."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, strategies as st

import jaxprune as jp
from jaxprune import models
from jaxprune.calibration.driver import CPU_CHUNK_TOKENS, DEVICE_BATCH, default_batch_size
from jaxprune.training.losses import head_nll

CONFIGS = {
    "llama": lambda: jp.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2),
    # Gemma 2 soft-caps its final logits inside the head: the chunks must go through the same head
    "gemma2": lambda: jp.Gemma2Config(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim_override=8),
}
_PARAMS = {}


def _params(name):
    if name not in _PARAMS:
        _PARAMS[name] = models.init(CONFIGS[name](), jax.random.key(1))
    return _PARAMS[name]


def numpy_nll(logits, tokens):
    z = np.asarray(logits, np.float64)[:, :-1]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]


_head_nll_jit = jax.jit(head_nll, static_argnames="chunk")


@pytest.mark.parametrize("name,chunk", [("llama", 5), ("llama", 48), ("gemma2", 1), ("gemma2", 128)])
def test_head_nll_equals_numpy_on_the_full_logits(name, chunk):
    """48 predictions in chunks that leave a padded last chunk, fit exactly, are single positions, or
    exceed them all."""
    batch, seqlen, seed = 3, 17, 0
    params = _params(name)
    tokens = np.random.default_rng(seed).integers(0, 37, (batch, seqlen)).astype(np.int32)
    got = _head_nll_jit(params, models.hidden_states(params, tokens), tokens, chunk=chunk)
    assert got.shape == (batch, seqlen - 1)
    want = numpy_nll(jp.forward(params, tokens), tokens)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


@given(seqlen=st.integers(1, 10_000), given_size=st.one_of(st.none(), st.integers(1, 64)))
def test_default_batch_size_fits_the_cpu_chunk(seqlen, given_size):
    got = default_batch_size(seqlen, given_size)
    if given_size is not None:
        assert got == given_size
    elif jax.default_backend() == "cpu":
        assert 1 <= got <= DEVICE_BATCH
        assert got == 1 or got * seqlen <= CPU_CHUNK_TOKENS          # no more tokens than the chunk ...
        assert got == DEVICE_BATCH or (got + 1) * seqlen > CPU_CHUNK_TOKENS   # ... and no fewer windows than fit
    else:
        assert got == DEVICE_BATCH


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_batch_size_is_rejected_before_any_work(bad):
    params = _params("llama")
    tokens = np.zeros((2, 8), np.int32)
    with pytest.raises(jp.InvalidArgumentError, match="batch_size"):
        jp.wanda(params, tokens, 0.5, batch_size=bad)
    with pytest.raises(jp.InvalidArgumentError, match="batch_size"):
        jp.owl_sparsities(params, tokens, 0.5, batch_size=bad)
