"""HardConcrete gates against closed forms and a numpy transcription; expected model size against
compaction (exactly for 0/1 gates, in expectation for Bernoulli gates); the L0 Lagrangian reaching
its target; final gates hitting a size or an architecture exactly; the optax step."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp
from jaxprune.structured import hardconcrete as hc
from jaxprune import models
from jaxprune.structured import l0
from jaxprune.structured.compact import compact, param_count
from jaxprune.errors import InvalidArgumentError
from jaxprune.structured.units import expected_size, gate_shapes

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1

CONFIGS = {
    "llama-gqa": jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                                num_attention_heads=6, num_key_value_heads=2),
    "llama-untied-bias": jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False,
                                        attention_bias=True, mlp_bias=True),
    "opt-pre-ln-project": jp.OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=40, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=16, word_embed_proj_dim=20),
    "opt-post-ln": jp.OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=40, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=16, do_layer_norm_before=False),
}
_PARAMS = {}


def init(name):
    if name not in _PARAMS:
        _PARAMS[name] = models.init(CONFIGS[name], jax.random.key(0))
    return _PARAMS[name]


# ---- HardConcrete ----

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_sample_is_the_stretched_clipped_concrete_of_its_uniforms():
    key = jax.random.key(3)
    la = np.linspace(-4, 4, 9).astype(np.float32)
    u = np.asarray(jax.random.uniform(key, la.shape, jnp.float32, 1e-6, 1 - 1e-6), np.float64)
    s = _sigmoid((np.log(u) - np.log(1 - u) + la) / BETA)
    want = np.clip(s * (ZETA - GAMMA) + GAMMA, 0, 1)
    np.testing.assert_allclose(np.asarray(hc.sample(key, la)), want, atol=1e-5)


@pytest.mark.parametrize("log_alpha", [-3.0, -1.0, 0.0, 0.7, 2.5])
def test_monte_carlo_nonzero_and_one_rates_match_closed_forms(log_alpha):
    n = 200_000
    z = np.asarray(hc.sample(jax.random.key(int(log_alpha * 10) + 100), jnp.full((n,), log_alpha)))
    p0 = 1 - _sigmoid(BETA * math.log(-GAMMA / (1 - GAMMA)) - log_alpha)  # P(s > -gamma / (zeta - gamma))
    p1 = _sigmoid(log_alpha - BETA * math.log((1 - GAMMA) / (ZETA - 1)))  # P(s >= (1 - gamma) / (zeta - gamma))
    tol = lambda p: 5 * math.sqrt(p * (1 - p) / n)                        # 5 standard errors
    assert abs(np.mean(z != 0) - p0) < tol(p0)
    assert abs(float(hc.prob_nonzero(log_alpha)) - p0) < 1e-6             # the closed form
    assert abs(np.mean(z == 1) - p1) < tol(p1)


def test_sample_is_differentiable_and_deterministic_gate_is_the_noise_free_one():
    g = jax.grad(lambda la: hc.sample(jax.random.key(0), la).sum())(jnp.zeros(64))
    assert np.all(np.asarray(g) >= 0) and np.any(np.asarray(g) > 0)
    la = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(np.asarray(hc.deterministic(la)),
                               np.clip(_sigmoid(la) * (ZETA - GAMMA) + GAMMA, 0, 1), atol=1e-6)


# ---- expected size ----

KINDS = ("heads", "kv_heads", "ffn", "hidden", "attn", "mlp", "layer")


def _random_binary(cfg, rng, p_zero):
    shapes = gate_shapes(cfg)
    g = {k: (rng.random(shapes[k]) > p_zero).astype(np.float32) for k in KINDS}
    g["hidden"][rng.integers(cfg.hidden_size)] = 1.0
    g["layer"][0] = g["attn"][0] = 1.0
    width = g["hidden"].sum()
    if width == getattr(cfg, "word_embed_proj_dim", None) and width < cfg.hidden_size:
        g["hidden"][np.flatnonzero(g["hidden"] == 0)[0]] = 1.0    # a *reduced* width OPT cannot describe
    return g


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), seed=st.integers(0, 10_000), p_zero=st.sampled_from([0.1, 0.4, 0.8]))
def test_expected_size_of_binary_gates_is_the_compacted_parameter_count(name, seed, p_zero):
    params = init(name)
    g = _random_binary(params.config, np.random.default_rng(seed), p_zero)
    if params.config.arch == "opt":
        g.pop("kv_heads")                       # OPT is MHA: groups are heads
    assert int(round(float(expected_size(params, g)))) == param_count(compact(params, g))


@pytest.mark.parametrize("name", ["llama-gqa", "opt-pre-ln-project"])
def test_expected_size_is_the_mean_size_under_independent_bernoulli_gates(name):
    params = init(name)
    cfg = params.config
    rng = np.random.default_rng(1)
    shapes = gate_shapes(cfg)
    probs = {k: rng.uniform(0.3, 1.0, shapes[k]).astype(np.float32) for k in ("heads", "kv_heads", "ffn", "layer")}
    probs["hidden"] = np.ones(shapes["hidden"], np.float32)
    n = 400
    no_layers = param_count(params) - param_count({"layers": params.tree["layers"]})   # final norm etc.
    sizes = []
    for _ in range(n):
        g = {k: (rng.random(v.shape) < v).astype(np.float32) for k, v in probs.items()}
        sizes.append(param_count(compact(params, g)) if g["layer"].any() else no_layers)
    sizes = np.asarray(sizes, np.float64)
    se = sizes.std() / math.sqrt(n)
    assert abs(sizes.mean() - float(expected_size(params, probs))) < 4 * se


def test_expected_size_is_differentiable_and_rejects_bad_shapes():
    params = init("llama-gqa")
    shapes = gate_shapes(params.config)
    grads = jax.grad(lambda p: expected_size(params, p))({k: jnp.full(shapes[k], 0.5) for k in ("heads", "ffn")})
    assert float(grads["heads"].min()) > 0 and float(grads["ffn"].min()) > 0
    with pytest.raises(InvalidArgumentError, match="needs"):
        expected_size(params, {"ffn": jnp.ones((2, 3))})
    with pytest.raises(InvalidArgumentError, match="unknown unit kinds"):
        expected_size(params, {"channels": jnp.ones(3)})


# ---- the Lagrangian, final gates, the optax step ----

def test_lagrangian_and_warmup():
    assert float(l0.lagrangian(0.8, 0.7, jnp.array([2.0, 3.0]))) == pytest.approx(2 * 0.1 + 3 * 0.01)
    t = l0.warmed_targets({"size": 0.6}, 5, 10)
    assert float(t["size"]) == pytest.approx(0.8)
    assert float(l0.warmed_targets({"size": 0.6}, 50, 10)["size"]) == pytest.approx(0.6)


def _calib(cfg, n=16, T=16, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), (n, T), 0, cfg.vocab_size), np.int32)


def test_lagrangian_drives_expected_size_to_the_target_on_a_tiny_model():
    params = init("llama-gqa")
    res = l0.l0_prune(params, _calib(params.config), target=0.4, steps=150, warmup=60, batch_size=2,
                      key=jax.random.key(0), show_progress=False, log_every=5)
    late = [h["expected"]["size"] for h in res.history if h["step"] >= 120]
    assert abs(np.mean(late) - 0.6) < 0.04, late
    first = res.history[0]["expected"]["size"]
    assert first > 0.9                                            # started near dense
    # final 0/1 gates: at most 60% left, and adding the next unit back would exceed it
    small = compact(res.params, res.gates)
    budget = 0.6 * param_count(params)
    assert param_count(small) <= budget
    assert res.removed_fraction == pytest.approx(1 - param_count(small) / param_count(params))
    assert res.removed_fraction < 0.4 + 0.1


def test_final_gates_size_target_is_within_one_ffn_channel_under_the_budget_by_rank():
    params = init("llama-gqa")
    cfg = params.config
    la = l0.init_log_alphas(cfg, ("heads", "ffn", "hidden"), key=jax.random.key(2), noise=2.0)
    g = {k: np.asarray(v) for k, v in l0.final_gates(params, la, target=0.35).items()}
    size, budget = param_count(compact(params, g)), 0.65 * param_count(params)
    assert budget - 3 * cfg.hidden_size < size <= budget                # one FFN channel costs 3 x hidden
    la = {k: np.asarray(v) for k, v in la.items()}
    kept = np.concatenate([la[k][g[k] > 0] for k in ("heads", "hidden")])
    gone = np.concatenate([la[k][g[k] == 0] for k in ("heads", "hidden")])
    assert kept.min() >= gone.max()                                     # one threshold for all kinds
    live = g["ffn"].any(axis=1)
    assert la["ffn"][live][g["ffn"][live] > 0].min() >= la["ffn"][live][g["ffn"][live] == 0].max()


def test_final_gates_for_a_target_architecture_give_exactly_its_widths():
    params = init("llama-gqa")
    cfg = params.config
    tgt = dataclasses.replace(cfg, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                              intermediate_size=24, hidden_size=36)
    kinds = ("heads", "kv_heads", "ffn", "hidden", "layer")
    la = l0.init_log_alphas(cfg, kinds, key=jax.random.key(5), noise=1.0)
    small = compact(params, l0.final_gates(params, la, target_config=tgt))
    c = small.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.hidden_size, c.layer_shapes) == (2, 3, 1, 24, 36, None)
    # the kept layers are the two with the highest log-alpha
    assert set(np.argsort(-np.asarray(la["layer"]))[:2]) == set(np.flatnonzero(l0.final_gates(
        params, la, target_config=tgt)["layer"]))


def test_target_config_errors_are_clear():
    params = init("llama-gqa")
    cfg = params.config
    with pytest.raises(InvalidArgumentError, match="kv_heads"):
        l0.size_targets(params, None, dataclasses.replace(cfg, num_key_value_heads=1), ("heads", "ffn"))
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        l0.size_targets(params, 0.3, cfg)
    with pytest.raises(InvalidArgumentError, match="not smaller"):
        l0.size_targets(params, None, cfg)
    with pytest.raises(InvalidArgumentError, match="fraction"):
        l0.size_targets(params, 1.5)


def test_step_with_a_user_optimizer_trains_gates_ascends_lambdas_and_freezes_weights():
    params = init("llama-gqa")
    cfg = params.config
    targets = l0.size_targets(params, 0.5)
    opt = l0.l0_optimizer(lr_gates=0.1, lr_lambdas=0.1, train_params=False)
    trainable = {"params": params.tree, "log_alphas": l0.init_log_alphas(cfg, ("heads", "ffn")),
                 "lambdas": {"size": jnp.zeros(2)}}
    state = opt.init(trainable)
    step = l0.l0_step(opt, config=cfg, targets=targets, warmup=1)
    batch = _calib(cfg)[:2]
    for i in range(3):
        trainable, state, m = step(trainable, state, batch, jax.random.key(i), i + 1)
    # expected size (about 0.98) is above the 0.5 target: ascent raises lambda1
    assert float(trainable["lambdas"]["size"][0]) > 0
    assert float(m["expected"]["size"]) > float(m["target"]["size"])
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), trainable["params"], params.tree)
    assert all(jax.tree.leaves(same))
    assert not np.allclose(np.asarray(trainable["log_alphas"]["heads"]), 3.0)


def test_distillation_loss_is_the_mean_token_kl_from_the_teacher():
    from jaxprune.training.masked import distillation_loss
    params = init("llama-gqa")
    batch = _calib(params.config)[:2]
    assert abs(float(distillation_loss(params, params, batch))) < 1e-6
    g = {"ffn": jnp.zeros((3, 40)), "heads": jnp.ones((3, 6)).at[:, :3].set(0.0)}
    t = np.asarray(models.forward(params, batch), np.float64) / 2.0
    s = np.asarray(models.forward(params, batch, g), np.float64) / 2.0
    lt = t - np.log(np.exp(t).sum(-1, keepdims=True))
    ls = s - np.log(np.exp(s).sum(-1, keepdims=True))
    want = np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1)) * 4.0
    assert float(distillation_loss(params, params, batch, g, temperature=2.0)) == pytest.approx(want, rel=1e-4)


def test_l0_prune_rejects_bad_input():
    params = init("llama-gqa")
    with pytest.raises(InvalidArgumentError, match="calib"):
        l0.l0_prune(params, np.zeros((4,), np.int32), target=0.3, key=jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="unit kinds"):
        l0.l0_prune(params, _calib(params.config), target=0.3, kinds=("rows",), key=jax.random.key(0))
    with pytest.raises(InvalidArgumentError, match="key"):
        l0.l0_prune(params, _calib(params.config), target=0.3)        # no silent default seed


def test_l0_prune_to_a_target_architecture_with_distillation_compacts_to_exactly_it():
    params = init("llama-gqa")
    cfg = params.config
    tgt = dataclasses.replace(cfg, num_hidden_layers=2, num_attention_heads=4, intermediate_size=20)
    res = l0.l0_prune(params, _calib(cfg), target_config=tgt, kinds=("heads", "ffn", "layer"), steps=6,
                      batch_size=2, key=jax.random.key(0), distill=True, train_params=False, show_progress=False, log_every=1)
    assert sorted(res.history[-1]["expected"]) == ["ffn", "heads", "layer"]
    assert all(np.isfinite(h["data"]) and h["data"] >= 0 for h in res.history)   # KL, not NLL
    c = compact(res.params, res.gates).config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 4, 2, 20)
