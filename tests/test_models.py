"""Forward parity with transformers (PyTorch, float32) and the meaning of every gate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.models.config import LlamaConfig, config_from_hf
from jaxprune.io.hf import from_named_arrays

from conftest import hf_to_named, tiny_llama, tiny_opt, torch_logits

TOL = 1e-4


def ours(model):
    return from_named_arrays(config_from_hf(model.config.to_dict()), hf_to_named(model))


def tokens(vocab, shape=(2, 19), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


LLAMA_CASES = {
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha": dict(num_key_value_heads=4),
    "mqa-bias-headdim": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, head_dim=24),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_logits_match_transformers(case):
    model = tiny_llama(**LLAMA_CASES[case])
    x = tokens(101, (2, 300))  # longer than one attention chunk (256)
    np.testing.assert_allclose(np.asarray(jp.forward(ours(model), x)), torch_logits(model, x), atol=TOL, rtol=0)


OPT_CASES = {
    "pre-ln": dict(do_layer_norm_before=True),
    "post-ln": dict(do_layer_norm_before=False),
    "project-in-out": dict(word_embed_proj_dim=32),
    "post-ln-project-in-out (opt-350m shape)": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
}


@pytest.mark.parametrize("case", sorted(OPT_CASES))
def test_opt_logits_match_transformers(case):
    model = tiny_opt(**OPT_CASES[case])
    x = tokens(99)
    np.testing.assert_allclose(np.asarray(jp.forward(ours(model), x)), torch_logits(model, x), atol=TOL, rtol=0)


# ---- gates: each gate must equal an edit of the weights written here in numpy ----

def small_llama():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return jp.init(cfg, jax.random.key(1))


def edit(params, layer, path, fn):
    tree = jax.tree.map(np.array, params.tree)
    node = tree["layers"][layer]
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = fn(node[path[-1]])
    return params.replace(jax.tree.map(jnp.asarray, tree))


def zero_rows(lo, hi):
    def f(w):
        w = w.copy()
        w[lo:hi] = 0
        return w
    return f


def zero_cols(lo, hi):
    def f(w):
        w = w.copy()
        w[:, lo:hi] = 0
        return w
    return f


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_head_gate_equals_zeroing_that_heads_output_rows():
    p = small_llama()
    x = tokens(50)
    Dh = p.config.head_dim
    g = {"heads": jnp.ones((2, 4)).at[1, 2].set(0.0)}
    ref = edit(p, 1, ("self_attn", "o_proj", "kernel"), zero_rows(2 * Dh, 3 * Dh))
    close(jp.forward(p, x, g), jp.forward(ref, x))


def test_kv_gate_removes_every_query_head_of_its_group():
    p = small_llama()
    x = tokens(50)
    Dh = p.config.head_dim
    g = {"kv_heads": jnp.ones((2, 2)).at[0, 1].set(0.0)}  # group 1 serves query heads 2, 3
    ref = edit(p, 0, ("self_attn", "v_proj", "kernel"), zero_cols(Dh, 2 * Dh))
    close(jp.forward(p, x, g), jp.forward(ref, x))


def test_ffn_gate_equals_zeroing_down_projection_rows():
    p = small_llama()
    x = tokens(50)
    g = {"ffn": jnp.ones((2, 48)).at[0, 5:9].set(0.0)}
    ref = edit(p, 0, ("mlp", "down_proj", "kernel"), zero_rows(5, 9))
    close(jp.forward(p, x, g), jp.forward(ref, x))


@pytest.mark.parametrize("arch", ["llama", "opt-pre", "opt-post"])
def test_sublayer_and_layer_gates_make_identity(arch):
    if arch == "llama":
        p = small_llama()
    else:
        p = ours(tiny_opt(do_layer_norm_before=(arch == "opt-pre")))
    x = tokens(50)
    layers = p.tree["layers"]
    attn_keys = {"input_layernorm", "self_attn", "self_attn_layer_norm"}
    drop_attn = p.replace({**p.tree, "layers": [{k: v for k, v in layers[0].items() if k not in attn_keys},
                                                layers[1]]})
    close(jp.forward(p, x, {"attn": jnp.array([0.0, 1.0])}), jp.forward(drop_attn, x))
    drop_mlp = p.replace({**p.tree, "layers": [layers[0], {k: v for k, v in layers[1].items()
                                                           if k in attn_keys}]})
    close(jp.forward(p, x, {"mlp": jnp.array([1.0, 0.0])}), jp.forward(drop_mlp, x))
    drop_layer = p.replace({**p.tree, "layers": [layers[1]]})
    close(jp.forward(p, x, {"layer": jnp.array([0.0, 1.0])}), jp.forward(drop_layer, x))


def test_hidden_gate_equals_model_sliced_to_kept_dims():
    p = small_llama()
    x = tokens(50)
    keep = np.ones(32, bool)
    keep[[3, 7, 8, 20]] = False
    cfg = p.config
    sliced_cfg = LlamaConfig(**{**cfg.__dict__, "hidden_size": int(keep.sum()), "head_dim_override": cfg.head_dim})

    def slice_leaf(path, w):
        name = [getattr(k, "key", None) for k in path]
        w = np.asarray(w)
        if name[-1] == "embedding":
            return w[:, keep]
        if name[-1] == "scale":
            return w[keep]
        if name[-2] in ("o_proj", "down_proj"):
            return w[:, keep]
        if name[-1] == "kernel" and name[-2] == "lm_head":
            return w[keep]
        return w[keep]  # q/k/v/gate/up kernels: rows are the hidden input

    sliced = jax.tree_util.tree_map_with_path(slice_leaf, p.tree)
    ref = jp.Params(sliced_cfg, jax.tree.map(jnp.asarray, sliced))
    close(jp.forward(p, x, {"hidden": jnp.asarray(keep, jnp.float32)}), jp.forward(ref, x))


def test_vmap_over_gates_equals_a_loop():
    p = small_llama()
    x = jnp.asarray(tokens(50))
    rng = np.random.default_rng(0)
    batch = {"heads": jnp.asarray(rng.random((5, 2, 4)) > 0.3, jnp.float32),
             "ffn": jnp.asarray(rng.random((5, 2, 48)) > 0.3, jnp.float32)}
    fwd = jax.jit(lambda g: jp.forward(p, x, g))
    vm = jax.vmap(fwd)(batch)
    for i in range(5):
        close(vm[i], fwd(jax.tree.map(lambda a: a[i], batch)))


def test_all_ones_gates_equal_no_gates():
    from jaxprune.models.gates import ones_like_model
    p = small_llama()
    x = tokens(50)
    close(jp.forward(p, x, ones_like_model(p.config)), jp.forward(p, x))


def test_params_pytree_keeps_config_and_paths():
    p = small_llama()
    doubled = jax.tree.map(lambda a: a * 2, p)
    assert isinstance(doubled, jp.Params) and doubled.config == p.config
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
    assert "['layers'][1]['mlp']['down_proj']['kernel']" in paths
    assert jax.jit(lambda q: q)(p).config == p.config


def test_forward_rejects_bad_tokens():
    p = small_llama()
    with pytest.raises(jp.InvalidArgumentError, match="integer array"):
        jp.forward(p, np.zeros((2, 3), np.float32))
    with pytest.raises(jp.InvalidArgumentError, match="unknown gate keys"):
        jp.forward(p, tokens(50), {"head": jnp.ones((2, 4))})
    with pytest.raises(jp.InvalidArgumentError, match="Params"):
        jp.forward(p.tree, tokens(50))
