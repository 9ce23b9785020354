"""The KV-cached decoding engine against full recomputation and against transformers' generate."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.errors import InvalidArgumentError
from jaxprune.generation import Sampler, cache_bytes, decode, decode_submodels, filter_logits, generate, init_cache
from tests.test_every_family import FAMILIES, _params

STEPS = 32
PROMPTS = [[5, 9, 2, 7, 7], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]   # ragged, longer than the windows


def full_recompute(params, prompts, new_tokens, gates=None):
    """Logits [B, N, V] without a cache: one whole forward over prompt + new tokens (right-padded),
    read at the positions that predicted each new token (causal: later tokens cannot matter)."""
    seqs = [list(p) + [int(t) for t in row] for p, row in zip(prompts, new_tokens)]
    buf = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for b, q in enumerate(seqs):
        buf[b, :len(q)] = q
    logits = np.asarray(jp.forward(params, jnp.asarray(buf), gates))
    n = np.shape(new_tokens)[1]
    return np.stack([logits[b, len(p) - 1:len(p) - 1 + n] for b, p in enumerate(prompts)])


def assert_cached_equals_recompute(params, prompts, gates=None, steps=STEPS):
    tokens, logits = decode(params, prompts, steps, gates=gates, return_logits=True)
    assert tokens.shape == (len(prompts), steps) and (tokens >= 0).all()
    ref = full_recompute(params, prompts, tokens, gates)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    assert (tokens == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_decoding_equals_full_recomputation(name):
    assert_cached_equals_recompute(_params(name), PROMPTS)


def test_compacted_non_uniform_model():
    """Layers of different widths, one without attention and one with unequal K/V groups."""
    params = _params("llama")
    gates = {"heads": jnp.array([[1., 0., 1., 1.], [1., 1., 1., 1.], [0., 1., 0., 1.]]),
             "ffn": jnp.ones((3, 48)).at[1, :20].set(0.0),
             "attn": jnp.array([1., 0., 1.])}
    small = jp.compact(params, gates)
    dims = [l.get("self_attn") is not None for l in small.tree["layers"]]
    assert dims == [True, False, True]
    assert_cached_equals_recompute(small, PROMPTS)
    assert init_cache(small, 2, 8)[1] is None


def test_vmapped_gates_equal_each_sub_model():
    params = _params("gemma2")
    S = 3
    g = {"heads": jnp.ones((S, 3, 4)).at[1, 0, 2].set(0.0).at[2, 2, :2].set(0.0),
         "ffn": jnp.ones((S, 3, 48)).at[2, 1, :30].set(0.0)}
    toks, logits = decode_submodels(params, PROMPTS, 12, g, batch_size=2, return_logits=True)
    assert toks.shape == (S, 3, 12)
    for s in range(S):
        one = jax.tree.map(lambda x: x[s], g)
        t1, l1 = decode(params, PROMPTS, 12, gates=one, return_logits=True)
        np.testing.assert_array_equal(toks[s], t1)
        np.testing.assert_allclose(logits[s], l1, atol=1e-4, rtol=0)
        np.testing.assert_allclose(l1, full_recompute(params, PROMPTS, t1, one), atol=1e-4, rtol=0)


def test_stop_tokens_end_rows_and_the_loop():
    params = _params("llama")
    free = decode(params, PROMPTS, 8)
    stop = int(free[0, 2])
    out = decode(params, PROMPTS, 8, stop_token_ids=[stop])
    for b in range(len(PROMPTS)):
        row, ref = out[b], free[b]
        hit = np.flatnonzero(ref == stop)
        if hit.size:
            k = hit[0]
            assert (row[:k + 1] == ref[:k + 1]).all() and (row[k + 1:] == -1).all()
        else:
            assert (row == ref).all()
    ids = generate(params, PROMPTS, 8, stop_token_ids=[stop])
    assert ids[0] == free[0, :list(free[0]).index(stop)].tolist()


def test_sampling_reproducible_for_a_key_and_different_across_keys():
    params = _params("qwen2")
    a = generate(params, PROMPTS, 16, temperature=1.0, key=jax.random.key(1))
    b = generate(params, PROMPTS, 16, temperature=1.0, key=jax.random.key(1))
    c = generate(params, PROMPTS, 16, temperature=1.0, key=jax.random.key(2))
    assert a == b and a != c
    assert generate(params, PROMPTS, 8, temperature=1.0, top_k=1, key=jax.random.key(3)) == generate(params, PROMPTS, 8)


def test_filter_logits_matches_a_numpy_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    s = Sampler(temperature=0.7, top_k=20, top_p=0.8)
    got = np.asarray(filter_logits(jnp.asarray(logits), s))
    for row, g in zip(logits, got):
        x = row / 0.7
        kept = set(np.argsort(-x)[:20])
        p = np.exp(x[list(kept)] - x[list(kept)].max())
        order = sorted(kept, key=lambda i: -x[i])
        probs = np.exp(x[order] - x[order].max()); probs /= probs.sum()
        before = np.cumsum(probs) - probs
        nucleus = {i for i, m in zip(order, before) if m < 0.8}
        assert set(np.flatnonzero(np.isfinite(g))) == nucleus
        assert p.size == 20


def test_bad_settings_are_rejected():
    params = _params("llama")
    with pytest.raises(InvalidArgumentError, match="explicit key"):
        generate(params, PROMPTS, 4, temperature=0.5)
    for kw in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(InvalidArgumentError):
            generate(params, PROMPTS, 4, key=jax.random.key(0), **{"temperature": 1.0, **kw})
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        generate(params, PROMPTS, 0)
    with pytest.raises(InvalidArgumentError, match="token ids"):
        generate(params, [[1, 64]], 4)
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        generate(params, ["text"], 4)
    with pytest.raises(InvalidArgumentError, match="one string"):
        generate(params, "text", 4)


def test_text_prompts_with_a_tokenizer():
    class Chars:
        eos_token_id = 0
        def encode(self, s): return [1 + ord(c) % 60 for c in s]
        def decode(self, ids): return "".join(chr(ord("a") + i % 26) for i in ids)
    params = _params("llama")
    texts = generate(params, ["hello", "a"], 6, tokenizer=Chars())
    ids = generate(params, [Chars().encode("hello"), Chars().encode("a")], 6, stop_token_ids=[0])
    assert texts == [Chars().decode(x) for x in ids]


def test_cache_memory_is_what_init_allocates():
    params = _params("llama")
    cache = init_cache(params, 4, 40)
    assert cache_bytes(params, 4, 40) == sum(x.nbytes for c in cache if c for x in c.values())


def test_batches_reuse_one_compilation_and_equal_one_batch():
    params = _params("mistral")
    whole = generate(params, PROMPTS * 2, 6)
    assert generate(params, PROMPTS * 2, 6, batch_size=4) == whole


torch_missing = importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None


@pytest.mark.skipif(torch_missing, reason="needs torch + transformers")
def test_greedy_tokens_equal_transformers_generate_random_llama(tmp_path):
    import torch
    import transformers
    params = _params("llama")
    jp.save(params, str(tmp_path / "m"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), torch_dtype=torch.float32).eval()
    for p in PROMPTS:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert len(ref) == STEPS
        assert generate(params, [p], STEPS) == [ref]


@pytest.mark.slow
@pytest.mark.skipif(torch_missing, reason="needs torch + transformers")
def test_greedy_tokens_equal_transformers_generate_smollm2(tmp_path, smollm2):
    import torch
    import transformers
    params, tok = smollm2
    jp.save(params, str(tmp_path / "m"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), torch_dtype=torch.float32).eval()
    prompts = ["It is a truth universally acknowledged, that", "The capital of France is"]
    for text in prompts:
        ids = tok.encode(text)
        with torch.no_grad():    # transformers stops at EOS and returns it; jaxprune stops and drops it
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=0)[0, len(ids):].tolist()
        if ref[-1] == tok.eos_token_id:
            ref = ref[:-1]
        assert generate(params, [ids], STEPS, tokenizer=tok) == [ref]
