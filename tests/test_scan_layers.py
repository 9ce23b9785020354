"""Stacked layers under `jax.lax.scan`: the same logits as the per-layer loop (with and without
gates, every Llama-like family and OPT), a lossless stack/unstack round trip, a program whose size
does not grow with depth, and a clear error for models whose layers differ."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import models
from jaxprune.core.params import Params
from jaxprune.errors import InvalidArgumentError
from jaxprune.models.gates import ones_like_model
from jaxprune.models.layout import layout_of
from jaxprune.models.gemma import Gemma2Config, Gemma3Config
from jaxprune.models.qwen import Qwen3Config

KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
          num_key_value_heads=2)
CONFIGS = {
    "llama": jp.LlamaConfig(**KW),
    "qwen3": Qwen3Config(**KW, head_dim_override=8),
    "gemma2": Gemma2Config(**KW, sliding_window=4),                               # sliding / global alternate
    "gemma3": Gemma3Config(**{**KW, "num_hidden_layers": 6}, sliding_window=4),  # five sliding, one global
    "opt": jp.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4),
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


def init(cfg, seed=0, dtype=np.float32):
    """`models.init`'s distribution drawn with numpy (eager jax.random is slow on a busy CPU)."""
    rng, offset = np.random.default_rng(seed), layout_of(cfg).norm_offset

    def leaf(path, shape):
        v = 0.02 * rng.standard_normal(shape)
        return jnp.asarray(v + (1.0 - offset) if path[-1].key == "scale" else v, dtype)

    return Params(cfg, jax.tree_util.tree_map_with_path(leaf, models.shapes(cfg), is_leaf=models.is_shape))


def random_gates(cfg, seed=1):
    """Every gate key, with values in (0.2, 1) so each one changes the logits."""
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.uniform(0.2, 1.0, v.shape), jnp.float32) for k, v in ones_like_model(cfg).items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_logits_equal_the_loop(name):
    cfg = CONFIGS[name]
    params = init(cfg)
    stacked = models.stack_layers(params)
    assert models.is_stacked(stacked) and not models.is_stacked(params)
    gates = random_gates(cfg)
    for g in (None, gates):
        loop, scan = jp.forward(params, TOKENS, g), jp.forward(stacked, TOKENS, g)
        np.testing.assert_allclose(np.asarray(scan), np.asarray(loop), atol=1e-5, rtol=0)
    # the gates matter, so the comparison above covers them
    assert float(jnp.max(jnp.abs(scan - jp.forward(stacked, TOKENS)))) > 1e-3
    if name == "gemma2":   # a batch of sub-models (vmap over gates) through the scanned type switch
        batch = jax.tree.map(lambda x: jnp.stack([x, jnp.ones_like(x)]), gates)
        many = jax.jit(jax.vmap(lambda g: models.logits(stacked, TOKENS, g)))(batch)
        np.testing.assert_allclose(np.asarray(many[0]), np.asarray(loop), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(many[1]), np.asarray(jp.forward(params, TOKENS)), atol=1e-5, rtol=0)
    if name == "llama":    # per-layer gates given as lists of per-layer arrays
        as_lists = {k: list(v) if k != "hidden" else v for k, v in gates.items()}
        np.testing.assert_allclose(np.asarray(jp.forward(stacked, TOKENS, as_lists)), np.asarray(loop),
                                   atol=1e-5, rtol=0)


def test_stack_unstack_round_trip():
    params = init(CONFIGS["gemma2"], dtype=jnp.bfloat16)
    stacked = models.stack_layers(params)
    L = params.config.num_hidden_layers
    assert models.num_layers(stacked) == models.num_layers(params) == L
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (L, 32, 48)
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    assert models.stack_layers(stacked) is stacked and models.unstack_layers(params) is params
    back = models.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    assert np.array_equal(np.asarray(models.layer_tree(stacked, 2)["mlp"]["down_proj"]["kernel"]),
                          np.asarray(params["layers"][2]["mlp"]["down_proj"]["kernel"]))


def test_stacking_abstract_weights():
    """Under eval_shape nothing is materialised: the benchmark's 70B-shaped path."""
    cfg = CONFIGS["llama"]
    abstract = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0), jnp.bfloat16))
    stacked = jax.eval_shape(models.stack_layers, abstract)
    leaf = stacked["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (4, 32, 32) and leaf.dtype == jnp.bfloat16


def _op_count(params) -> int:
    """Operations in the lowered (StableHLO) program of the forward."""
    text = jax.jit(models.logits).lower(params, TOKENS).as_text()
    return len(re.findall(r"\bstablehlo\.[a-z_]+", text))


def _model(n_layers):
    cfg = jp.LlamaConfig(**{**KW, "num_hidden_layers": n_layers})
    return jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))


def test_scanned_program_does_not_grow_with_depth():
    shallow, deep = _model(2), _model(12)
    scanned = [_op_count(jax.eval_shape(models.stack_layers, p)) for p in (shallow, deep)]
    looped = [_op_count(p) for p in (shallow, deep)]
    assert scanned[0] == scanned[1]
    assert looped[1] > 3 * looped[0]      # the loop's program does grow: the check above can fail


def test_non_uniform_models_are_rejected():
    cfg = CONFIGS["llama"]
    params = init(cfg)
    # a compacted model whose layers keep different FFN widths
    ffn = np.ones((4, 48), np.float32)
    ffn[1, :16] = 0
    narrow = jp.compact(params, {"ffn": ffn})
    with pytest.raises(InvalidArgumentError, match=r"layer 1 differs from layer 0.*mlp"):
        models.stack_layers(narrow)
    # a layer whose attention sublayer was removed
    no_attn = jp.compact(params, {"attn": np.array([1, 1, 0, 1], np.float32)})
    with pytest.raises(InvalidArgumentError, match=r"layer 2 differs from layer 0: it lacks .*self_attn"):
        models.stack_layers(no_attn)
    with pytest.raises(InvalidArgumentError, match="jaxprune Params"):
        models.stack_layers(params.tree)


def test_uniformly_compacted_model_can_be_stacked():
    """Compaction that leaves every layer alike (here: the same FFN channels everywhere) still scans."""
    cfg = CONFIGS["llama"]
    params = init(cfg)
    ffn = np.ones((4, 48), np.float32)
    ffn[:, :16] = 0
    small = jp.compact(params, {"ffn": ffn})
    np.testing.assert_allclose(np.asarray(jp.forward(models.stack_layers(small), TOKENS)),
                               np.asarray(jp.forward(small, TOKENS)), atol=1e-5, rtol=0)


def test_entry_points_that_take_a_layer_list_reject_stacked_params(tmp_path):
    """Pruning, decoding, compaction and saving name the fix instead of failing deep inside."""
    import jaxprune as jp
    from jaxprune import models
    from jaxprune.errors import InvalidArgumentError
    cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    stacked = models.stack_layers(models.init(cfg, jax.random.key(0)))
    calls = [lambda: jp.magnitude(stacked, 0.5), lambda: jp.generate(stacked, [[1, 2]], max_new_tokens=2),
             lambda: jp.compact(stacked, {"ffn": jnp.ones((2, 64))}), lambda: jp.save(stacked, tmp_path / "x")]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="unstack_layers"):
            call()
