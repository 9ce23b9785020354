"""FinerCut: greedy sublayer removal order on tiny Llama and OPT models."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

fc = importlib.import_module("jaxprune.structured.finercut")   # the module; `jaxprune.structured.finercut` is the function

L = 3


def scaled_init(cfg, seed=0, scale=8.0):
    """Random params with kernels and embeddings scaled up, so sublayers move the output."""
    p = jp.init(cfg, jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if path[-1].key in ("scale", "bias") else x * scale, p)


def tiny(arch):
    if arch == "llama":
        cfg = jp.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=L,
                             num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = jp.OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=64, num_hidden_layers=L,
                           num_attention_heads=4, max_position_embeddings=64)
    return scaled_init(cfg)


def calib(params, n=3, t=12, seed=0):
    return np.random.default_rng(seed).integers(0, params.config.vocab_size, (n, t)).astype(np.int32)


OUT_PROJ = {("llama", "attn"): ("self_attn", "o_proj"), ("llama", "mlp"): ("mlp", "down_proj"),
            ("opt", "attn"): ("self_attn", "out_proj"), ("opt", "mlp"): ("fc2",)}


def zero_output(params, kind, layer):
    """The model with sublayer (kind, layer)'s output projection (kernel and bias) zeroed: its update is 0."""
    prefix = ("layers", layer) + OUT_PROJ[(params.config.arch, kind)]
    keys = lambda path: tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if keys(path)[:len(prefix)] == prefix else x, params)


def np_jsd(a, b):
    """Mean JSD over positions between logits a and b [..., V], plain numpy float64."""
    def logsm(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsm(a), logsm(b)
    p, q = np.exp(lp), np.exp(lq)
    m = 0.5 * (p + q)
    return float(np.mean(0.5 * (p * (lp - np.log(m))).sum(-1) + 0.5 * (q * (lq - np.log(m))).sum(-1)))


def loop_divergences(params, tokens, removed, candidates):
    """Each candidate's JSD by a Python loop of single forwards."""
    dense = np.asarray(jp.forward(params, tokens))
    out = []
    for c in candidates:
        g = {k: jnp.asarray(v) for k, v in fc._gate_arrays(list(removed) + [c], L).items()}
        out.append(np_jsd(dense, np.asarray(jp.forward(params, tokens, g))))
    return np.array(out)


ARCHS = ["llama", "opt"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_zeroed_sublayer_is_removed_first(arch, kind):
    params = zero_output(tiny(arch), kind, 1)
    res = fc.finercut(params, calib(params), n_remove=2, submodels_per_batch=4, show_progress=False)
    assert res.order[0] == (kind, 1)
    assert abs(res.divergences[0]) < 1e-6
    assert res.divergences[1] > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_vmapped_candidates_equal_a_loop_of_forwards(arch):
    params, removed = tiny(arch), [("mlp", 0), ("attn", 2)]
    tokens = calib(params)
    candidates = [c for c in sorted(fc.sublayer_params(params), key=lambda c: (c[1], c[0])) if c not in removed]
    stacked = fc._stacked_candidates(removed, candidates, L, 8)   # 4 candidates, chunks of 4: one is skipped
    dense = fc._dense_logprobs(params, jnp.asarray(tokens))
    got = np.asarray(fc._candidate_divergences(params, jnp.asarray(tokens), dense, stacked, len(candidates), 4))
    want = loop_divergences(params, tokens, removed, candidates)
    np.testing.assert_allclose(got[:4], want, rtol=2e-3, atol=1e-6)
    assert np.all(np.isinf(got[4:]))
    assert want.min() > 1e-4   # the check is not vacuous


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_choices_and_divergences_match_the_loop(arch):
    params = tiny(arch)
    tokens = calib(params)
    res = fc.finercut(params, tokens, n_remove=3, submodels_per_batch=4, show_progress=False)
    for k, (chosen, div) in enumerate(zip(res.order, res.divergences)):
        remaining = [c for c in fc.sublayer_params(params) if c not in res.order[:k]]
        want = loop_divergences(params, tokens, res.order[:k], remaining)
        assert chosen == remaining[int(np.argmin(want))]
        np.testing.assert_allclose(div, want.min(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_order_is_a_permutation_and_gates_follow_it(arch):
    params = tiny(arch)
    res = fc.finercut(params, calib(params), submodels_per_batch=4, show_progress=False)
    sizes = fc.sublayer_params(params)
    assert len(res.order) == len(set(res.order)) == 2 * L
    assert set(res.order) == set(sizes)
    assert res.params_removed == list(np.cumsum([sizes[c] for c in res.order]))
    assert len(res.divergences) == 2 * L and all(np.isfinite(res.divergences))
    for k in range(2 * L + 1):
        g = res.gates_after(k)
        assert set(g) == {"attn", "mlp"} and g["attn"].shape == (L,) and g["attn"].dtype == jnp.float32
        off = {(kind, i) for kind in ("attn", "mlp") for i in range(L) if g[kind][i] == 0}
        assert off == set(res.order[:k])
        assert np.all((np.asarray(g["attn"]) == 0) | (np.asarray(g["attn"]) == 1))
    assert all(float(v.sum()) == 0 for v in res.gates_after().values())
    # divergence reported at step k is that of the gated model
    tokens = calib(params)
    k = 2
    want = np_jsd(np.asarray(jp.forward(params, tokens)), np.asarray(jp.forward(params, tokens, res.gates_after(k))))
    np.testing.assert_allclose(res.divergences[k - 1], want, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_target_stops_once_the_fraction_is_reached(arch):
    params = tiny(arch)
    res = fc.finercut(params, calib(params), target=0.3, submodels_per_batch=4, show_progress=False)
    total = fc.non_embedding_params(params)
    assert res.total_params == total
    assert res.params_removed[-1] >= 0.3 * total
    assert len(res.params_removed) == 1 or res.params_removed[-2] < 0.3 * total


def test_sublayer_params_counts():
    D, F = 32, 48
    llama = fc.sublayer_params(tiny("llama"))
    Dkv = 2 * (D // 4)   # 2 K/V heads of head_dim 8
    assert llama[("attn", 0)] == 2 * D * D + 2 * D * Dkv + D
    assert llama[("mlp", 2)] == 3 * D * F + D
    F = 64
    opt = fc.sublayer_params(tiny("opt"))
    assert opt[("attn", 1)] == 4 * (D * D + D) + 2 * D
    assert opt[("mlp", 0)] == 2 * D * F + F + D + 2 * D
    for arch, counts in (("llama", llama), ("opt", opt)):
        params = tiny(arch)
        final_norm = params.tree["norm"] if arch == "llama" else params.tree["final_layer_norm"]
        rest = sum(int(x.size) for x in jax.tree.leaves(final_norm))
        assert sum(counts.values()) + rest == fc.non_embedding_params(params)


def test_compacted_sublayer_is_not_a_candidate():
    params = tiny("llama")
    layers = list(params.tree["layers"])
    layers[0] = {k: v for k, v in layers[0].items() if k not in ("self_attn", "input_layernorm")}
    params = params.replace({**params.tree, "layers": layers})
    assert ("attn", 0) not in fc.sublayer_params(params)
    res = fc.finercut(params, calib(params), submodels_per_batch=4, show_progress=False)
    assert len(res.order) == 2 * L - 1 and ("attn", 0) not in res.order


@pytest.mark.parametrize("kwargs, match", [
    (dict(calib=np.zeros((4,), np.int32)), "calib"),
    (dict(calib=np.zeros((2, 4), np.float32)), "calib"),
    (dict(calib=np.zeros((0, 4), np.int32)), "calib"),
    (dict(calib=np.full((2, 4), 101, np.int32)), r"\[0, 101\)"),
    (dict(n_remove=0), "n_remove"),
    (dict(n_remove=2 * L + 1), "n_remove"),
    (dict(n_remove=1.5), "n_remove"),
    (dict(target=0.0), "target"),
    (dict(target=1.0), "target"),
    (dict(target=True), "target"),
    (dict(n_remove=1, target=0.5), "not both"),
    (dict(submodels_per_batch=0), "submodels_per_batch"),
])
def test_invalid_arguments_are_rejected(kwargs, match):
    params = tiny("llama")
    kwargs = {"calib": calib(params), **kwargs}
    with pytest.raises(jp.InvalidArgumentError, match=match):
        fc.finercut(params, **kwargs)


def test_gates_rejects_bad_k_and_params_must_be_params():
    res = fc.FinerCutResult(gates={}, removed_fraction=0.1, history=[], order=[("attn", 0)], divergences=[0.1],
                            params_removed=[10], num_layers=2, total_params=100)
    with pytest.raises(jp.InvalidArgumentError, match="k must"):
        res.gates_after(2)
    with pytest.raises(jp.InvalidArgumentError, match="Params"):
        fc.finercut({"layers": []}, np.zeros((1, 4), np.int32))
