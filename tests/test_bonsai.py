"""Bonsai's parts against plain references: vmapped utility vs a loop, antithetic sampling,
ridge vs numpy least squares; and the driver end to end on a tiny model."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp
from jaxprune.structured import units as structured
from jaxprune.structured.utility import evaluate, perplexity_utility

B = importlib.import_module("jaxprune.structured.bonsai")  # the module (jp.bonsai is the function)

CFG = jp.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny():
    params = jp.init(CFG, jax.random.key(0))
    calib = jax.random.randint(jax.random.key(1), (3, 12), 0, CFG.vocab_size)
    return params, calib


def random_gates(key, n):
    k1, k2 = jax.random.split(key)
    return {"heads": jax.random.bernoulli(k1, 0.7, (n, 2, 6)).astype(jnp.float32),
            "ffn": jax.random.bernoulli(k2, 0.7, (n, 2, 40)).astype(jnp.float32)}


def test_vmapped_utility_equals_loop_of_single_evaluations(tiny):
    params, calib = tiny
    u = perplexity_utility(calib)
    g = random_gates(jax.random.key(2), 5)
    batched = evaluate(u, params, g, batch_size=2)  # 5 = 2 + 2 + 1: a ragged last batch
    single = jax.jit(u)
    loop = [float(single(params, jax.tree.map(lambda x: x[i], g))) for i in range(5)]
    np.testing.assert_allclose(batched, loop, rtol=1e-5)
    # and the utility itself is minus the perplexity jaxprune reports
    one = jax.tree.map(lambda x: x[0], g)
    assert float(single(params, one)) == pytest.approx(-jp.perplexity(params, np.asarray(calib), gates=one), rel=1e-5)


@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 4))
@settings(max_examples=30, deadline=None)
def test_antithetic_pairs(seed, n_cand, n_pairs):
    rng = np.random.default_rng(seed)
    M, n = 3, 8
    alive = rng.random((M, n)) < 0.8
    prior = rng.random((M, n)).astype(np.float32)
    score = np.where(alive, prior, np.inf)
    rank = np.argsort(np.argsort(score, axis=1), axis=1)
    cand = alive & (rank < n_cand)
    w = B.sampling_weights(jnp.asarray(prior), jnp.asarray(alive), jnp.asarray(cand))
    masks = np.asarray(B.antithetic_masks(jax.random.key(seed), w, jnp.asarray(alive), jnp.asarray(cand), n_pairs))
    assert masks.shape == (2 * n_pairs, M, n)
    fixed = alive & ~cand
    for a, b in zip(masks[0::2], masks[1::2]):
        assert not (a & ~alive).any() and not (b & ~alive).any()          # dead units stay dead
        assert (a[fixed]).all() and (b[fixed]).all()                       # fixed units always kept
        np.testing.assert_array_equal((a ^ b), cand)                       # candidates split exactly
        dropped = (cand & ~a).sum(1)                                        # half the candidates
        assert ((dropped == cand.sum(1) // 2) | (dropped == (cand.sum(1) + 1) // 2)).all()


def test_sampling_follows_the_weights():
    """With two candidates one is dropped per sample: categorical with p proportional to the weights;
    with one candidate it is dropped in half of the pairs."""
    w = jnp.array([[1.0, 0.0, 4.0], [3.0, 0.0, 0.0]])
    alive = jnp.ones((2, 3), bool)
    cand = jnp.array([[True, False, True], [True, False, False]])
    masks = np.asarray(B.antithetic_masks(jax.random.key(0), w, alive, cand, 20_000))
    freq = (~masks[0::2]).mean(axis=0)
    np.testing.assert_allclose(freq[0], [1 / 5, 0.0, 4 / 5], atol=0.015)  # ~5 sigma at n=20000
    np.testing.assert_allclose(freq[1], [0.5, 0.0, 0.0], atol=0.015)


def test_sampling_weights_prefer_low_prior():
    prior = jnp.array([[0.1, 0.5, 0.9, 2.0]])
    alive = jnp.ones((1, 4), bool)
    cand = jnp.array([[True, True, True, False]])
    w = np.asarray(B.sampling_weights(prior, alive, cand))[0]
    assert w[0] > w[1] > w[2] > 0 and w[3] == 0


@pytest.mark.parametrize("S,P", [(12, 30), (40, 7)])  # dual and primal
def test_ridge_matches_numpy_least_squares(S, P):
    rng = np.random.default_rng(S)
    X = (rng.random((S, P)) < 0.5).astype(float)
    y = rng.normal(size=S)
    lam = 0.7
    Xc, yc = X - X.mean(0), y - y.mean()
    A = np.vstack([Xc, np.sqrt(lam) * np.eye(P)])
    b = np.concatenate([yc, np.zeros(P)])
    ref = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose(B.ridge(X, y, lam), ref, rtol=1e-8, atol=1e-10)
    # shrunk towards a prior: penalty lam ||w - c p||^2 with c the least-squares scale of p
    p = rng.random(P)
    z = Xc @ p
    w0 = max(z @ yc / (z @ z), 0.0) * p
    ref = np.linalg.lstsq(A, np.concatenate([yc, np.sqrt(lam) * w0]), rcond=None)[0]
    np.testing.assert_allclose(B.ridge(X, y, lam, prior=p), ref, rtol=1e-8, atol=1e-10)
    # with an overwhelming penalty the prior's (scaled) values come back
    np.testing.assert_allclose(B.ridge(X, y, 1e12, prior=p), w0, atol=1e-6)


def test_ridge_cv_chooses_by_held_out_error():
    rng = np.random.default_rng(0)
    X = (rng.random((60, 10)) < 0.5).astype(float)
    w = rng.normal(size=10)
    lams = [1e-4, 1e-2, 1.0, 1e4]
    _, lam, _ = B.ridge_cv(X, X @ w, lams)                 # noiseless linear data: no shrinkage
    assert lam == 1e-4
    _, lam, _ = B.ridge_cv(X, rng.normal(size=60), lams)   # pure noise: shrink everything
    assert lam == 1e4
    # pairs stay together across folds
    w_fit, _, errs = B.ridge_cv(X, X @ w, lams, folds=3, groups=np.arange(60) // 2)
    assert len(errs) == 4 and np.allclose(w_fit, w, atol=1e-2)


def test_bonsai_reaches_the_target_and_is_reproducible(tiny):
    params, calib = tiny
    r1 = jp.bonsai(params, calib, target=0.25, n_samples=12, key=jax.random.key(3), show_progress=False)
    r2 = jp.bonsai(params, calib, target=0.25, n_samples=12, key=jax.random.key(3), show_progress=False)
    assert r1.removed_fraction >= 0.25
    for k in r1.gates:
        np.testing.assert_array_equal(r1.gates[k], r2.gates[k])
        assert set(np.unique(np.asarray(r1.gates[k]))) <= {0.0, 1.0}
    dense = structured.non_embedding_params(params)
    small = r1.compact(params)
    assert structured.non_embedding_params(small) == r1.history[-1]["params_left"] < dense
    for r in r1.history:       # the size accounting (expected_size of 0/1 gates) is the compacted count
        assert r["params_left"] == structured.non_embedding_params(jp.compact(params, r["gates"]))
    tokens = calib[:1]
    np.testing.assert_allclose(jp.forward(small, tokens), jp.forward(params, tokens, r1.gates), atol=1e-4)
    fractions = [r["removed_fraction"] for r in r1.history]
    assert len(fractions) >= 2 and fractions == sorted(fractions)


def test_prior_only_mode_and_errors(tiny):
    params, calib = tiny
    r = jp.bonsai(params, calib, target=0.2, n_samples=0, show_progress=False)
    assert r.removed_fraction >= 0.2 and "ridge" not in r.history[0]
    for bad in (dict(target=1.2), dict(target=0.2, n_samples=3), dict(target=0.2, kinds=("attn",)),
                dict(target=0.2, step=0.0), dict(target=0.2, n_samples=4)):   # the last: sampling needs a key
        with pytest.raises(jp.InvalidArgumentError):
            jp.bonsai(params, calib, **bad)
    with pytest.raises(jp.InvalidArgumentError):
        jp.bonsai(params, np.zeros((2, 3), np.float32), target=0.2)


def test_bonsai_takes_any_utility_traceable_or_host_side(tiny):
    """The same utility as a traced function (vmapped) and as a host-side `evaluate_batch`
    gives the same pruning; the host one is called once per round with the whole batch."""
    params, calib = tiny

    class HostUtility:
        calls = []

        def evaluate_batch(self, params, stacked_gates, batch_size=None):
            HostUtility.calls.append(np.shape(stacked_gates["ffn"])[0])
            return np.asarray(stacked_gates["ffn"])[:, 0] @ np.arange(1.0, 41.0)

    weights = jnp.arange(1.0, 41.0)  # integer sums: exact in float32 and float64
    traced = jp.bonsai(params, calib, target=0.1, n_samples=16, utility=lambda p, g: g["ffn"][0] @ weights,
                       key=jax.random.key(0), show_progress=False)
    host = jp.bonsai(params, calib, target=0.1, n_samples=16, utility=HostUtility(), key=jax.random.key(0),
                     show_progress=False)
    assert HostUtility.calls == [16] * len(host.history) and len(host.history) >= 1
    assert traced.removed_fraction >= 0.1 and host.removed_fraction >= 0.1
    for k in traced.gates:
        np.testing.assert_array_equal(traced.gates[k], host.gates[k])
