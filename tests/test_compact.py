"""compact(): the sliced model's logits equal the gated model's; exports load back (and in
transformers when uniform); bad gates are rejected with clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp
from jaxprune import models
from jaxprune.structured.compact import compact, effective_gates, param_count
from jaxprune.models.gates import ones_like_model

from conftest import torch_logits

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 50, (2, 7)).astype(np.int32)

LLAMA = {
    "gqa": jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2),
    "gqa-untied-bias": jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                                      attention_bias=True, mlp_bias=True),
}
OPT = {
    "pre-ln": jp.OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=16),
    "post-ln": jp.OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=16, do_layer_norm_before=False),
    "project-in-out": jp.OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=40, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=16, word_embed_proj_dim=20),
    "post-ln-project": jp.OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=40, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=16, word_embed_proj_dim=20,
                                    do_layer_norm_before=False),
}
_PARAMS = {}


def init(cfg):
    if cfg not in _PARAMS:
        _PARAMS[cfg] = models.init(cfg, jax.random.key(0))
    return _PARAMS[cfg]


def maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def logits(params, gates=None):
    return models.forward(params, TOKENS, gates)


def random_gates(cfg, seed, binary_sublayers=False):
    """Every key (all present, so the gated forward compiles once per config): mostly 1, some 0,
    some non-binary values on heads / ffn / sublayers."""
    rng = np.random.default_rng(seed)
    L, H, KV, F, D = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.intermediate_size, cfg.hidden_size)

    def gate(shape, values, p):
        return rng.choice(np.asarray(values, np.float32), size=shape, p=p)

    sub = ([1.0, 0.0], [0.75, 0.25]) if binary_sublayers else ([1.0, 0.0, 0.7], [0.6, 0.2, 0.2])
    g = {"heads": gate((L, H), [1.0, 0.0, 0.5, 1.5], [0.5, 0.3, 0.1, 0.1]),
         "kv_heads": gate((L, KV), [1.0, 0.0], [0.8, 0.2]), "ffn": gate((L, F), [1.0, 0.0, 0.25], [0.6, 0.3, 0.1]),
         "attn": gate((L,), *sub), "mlp": gate((L,), *sub), "layer": gate((L,), [1.0, 0.0], [0.85, 0.15]),
         "hidden": gate((D,), [1.0, 0.0], [0.8, 0.2])}
    if not g["hidden"].any():
        g["hidden"][0] = 1.0
    if cfg.arch == "opt" and cfg.word_embed_proj_dim != D and g["hidden"].sum() == cfg.word_embed_proj_dim:
        g["hidden"][np.flatnonzero(g["hidden"])[0]] = 0.0  # D' == P cannot be described (tested below)
    return {k: jnp.asarray(v) for k, v in g.items()}


@pytest.mark.parametrize("name", list(LLAMA))
@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_llama_compact_equals_gated_forward(name, seed):
    cfg = LLAMA[name]
    params = init(cfg)
    gates = random_gates(cfg, seed)
    small = compact(params, gates)
    assert maxdiff(logits(small), logits(params, effective_gates(params, gates))) <= TOL
    if not cfg.attention_bias:  # no bias: a sublayer that lost every unit adds exactly nothing
        assert maxdiff(logits(small), logits(params, gates)) <= TOL
    assert param_count(small) <= param_count(params)


@pytest.mark.parametrize("name", list(OPT))
@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_opt_compact_equals_gated_forward(name, seed):
    cfg = OPT[name]
    params = init(cfg)
    gates = random_gates(cfg, seed, binary_sublayers=not cfg.do_layer_norm_before)
    small = compact(params, gates)
    eff = effective_gates(params, gates)
    assert maxdiff(logits(small), logits(params, eff)) <= TOL
    emptied = (np.asarray(eff["attn"]) != np.asarray(gates["attn"])) | (np.asarray(eff["mlp"]) != np.asarray(gates["mlp"]))
    if not emptied.any():
        assert maxdiff(logits(small), logits(params, gates)) <= TOL


def test_effective_gates_mark_emptied_sublayers_only():
    params = init(OPT["pre-ln"])
    g = {"heads": jnp.ones((2, 4)).at[0].set(0.0), "ffn": jnp.ones((2, 40)).at[1, :39].set(0.0)}
    eff = effective_gates(params, g)
    assert eff["attn"].tolist() == [0.0, 1.0] and eff["mlp"].tolist() == [1.0, 1.0]
    # OPT's out_proj bias is still added by the gated forward: compaction drops it with the sublayer
    assert maxdiff(logits(compact(params, g)), logits(params, g)) > 1e-3
    assert maxdiff(logits(compact(params, g)), logits(params, eff)) <= TOL


def test_removed_sublayers_and_layers_round_trip(tmp_path):
    cfg = jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2)
    params = init(cfg)
    g = {"attn": jnp.array([0.0, 1.0, 1.0, 0.5]), "layer": jnp.array([1.0, 1.0, 0.0, 1.0]),
         "ffn": jnp.ones((4, 40)).at[1].set(0.0)}
    small = compact(params, g)
    assert small.config.num_hidden_layers == 3 and len(small.tree["layers"]) == 3  # layer 2 dropped
    assert [dict(d) for d in small.config.layer_shapes] == [
        {"n_heads": 0, "n_kv": 0, "ffn_dim": 40}, {"n_heads": 6, "n_kv": 2, "ffn_dim": 0},
        {"n_heads": 6, "n_kv": 2, "ffn_dim": 40}]
    assert set(small.tree["layers"][0]) == {"mlp", "post_attention_layernorm"}
    assert set(small.tree["layers"][1]) == {"self_attn", "input_layernorm"}
    ref = logits(params, g)
    assert maxdiff(logits(small), ref) <= TOL
    back = jp.load(jp.save(small, str(tmp_path / "out")))
    assert back.config == small.config
    assert maxdiff(logits(back), ref) <= 1e-6
    # every layer gone: embeddings, final norm and LM head remain
    none = compact(params, {"layer": jnp.zeros(4)})
    assert none.config.num_hidden_layers == 0 and param_count(none) == 48
    assert maxdiff(logits(jp.load(jp.save(none, str(tmp_path / "none")))), logits(params, {"layer": jnp.zeros(4)})) <= TOL


def test_unequal_kv_groups_round_trip_and_compact_again(tmp_path):
    cfg = jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, attention_bias=True)
    params = init(cfg)
    # layer 0: groups keep 1 and 3 heads -> reordered (3, 1); layer 1: (2, 3) -> (3, 2);
    # layer 2: (3, 1) again with the same widths as layer 0: no padding needed
    heads = jnp.array([[0, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1], [1, 1, 1, 0.5, 0, 0]], jnp.float32)
    small = compact(params, {"heads": heads})
    shapes = [dict(d) for d in small.config.layer_shapes]
    assert shapes[0] == {"n_heads": 4, "n_kv": 2, "ffn_dim": 40, "kv_groups": (3, 1)}
    assert shapes[1] == {"n_heads": 5, "n_kv": 2, "ffn_dim": 40, "kv_groups": (3, 2)}
    assert shapes[2] == shapes[0]
    ref = logits(params, {"heads": heads})
    assert maxdiff(logits(small), ref) <= TOL
    back = jp.load(jp.save(small, str(tmp_path / "out")))
    assert back.config == small.config and maxdiff(logits(back), ref) <= 1e-6
    # list-form gates on the compacted model (K/V gates over unequal groups), compacted again
    g2 = {"kv_heads": [jnp.array([1.0, 0.5]), jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0])],
          "heads": [jnp.array([1.0, 0.0, 1.0, 1.0]), jnp.ones(5), jnp.array([1.0, 1.0, 2.0, 1.0])]}
    smaller = compact(small, g2)
    assert [dict(d)["n_heads"] for d in smaller.config.layer_shapes] == [3, 2, 4]
    assert maxdiff(logits(smaller), logits(small, g2)) <= TOL


def test_equal_widths_with_different_groupings_stay_exact():
    cfg = jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2)
    params = init(cfg)
    # 4 heads in 2 groups as (2, 2), (3, 1) and (1, 3) -> (3, 1): equal widths, two groupings
    heads = jnp.array([[1, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1]], jnp.float32)
    small = compact(params, {"heads": heads})
    shapes = [dict(d) for d in small.config.layer_shapes]
    assert shapes[0] == {"n_heads": 4, "n_kv": 2, "ffn_dim": 40}
    assert shapes[1] == shapes[2] == {"n_heads": 4, "n_kv": 2, "ffn_dim": 40, "kv_groups": (3, 1)}
    assert maxdiff(logits(small), logits(params, {"heads": heads})) <= TOL


def test_uniform_llama_is_plain_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cfg = LLAMA["gqa-untied-bias"]
    params = init(cfg)
    hidden = np.ones(48, np.float32)
    hidden[[1, 5, 30, 47]] = 0.0  # 44 left: transformers 5 wants hidden_size % heads == 0 (head_dim stays 8)
    g = {"heads": jnp.array([[0.0, 1.0, 1.3, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0, 0.8, 1.0]]),
         "ffn": jnp.ones((2, 40)).at[0, :10].set(0.0).at[1, 30:].set(0.0).at[:, 12].set(0.5),
         "attn": jnp.array([0.9, 1.0]), "layer": jnp.array([1.0, 1.2]), "hidden": jnp.asarray(hidden)}
    small = compact(params, g)
    c = small.config
    assert c.layer_shapes is None
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size, c.head_dim) == (4, 2, 30, 44, 8)
    ref = logits(params, g)
    assert maxdiff(logits(small), ref) <= TOL
    out = jp.save(small, str(tmp_path / "out"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert maxdiff(torch_logits(model, TOKENS), ref) <= TOL
    assert maxdiff(logits(jp.load(out)), ref) <= 1e-6


def test_opt_ffn_compaction_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cfg = OPT["project-in-out"]
    params = init(cfg)
    g = {"ffn": jnp.ones((2, 40)).at[0, :8].set(0.0).at[1, 3:11].set(0.0).at[1, 20].set(1.5)}
    small = compact(params, g)
    assert small.config.layer_shapes is None and small.config.ffn_dim == 32
    ref = logits(params, g)
    out = jp.save(small, str(tmp_path / "out"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert maxdiff(torch_logits(model, TOKENS), ref) <= TOL
    # heads and hidden dims: not loadable by transformers (OPT needs heads * head_dim == hidden),
    # but our loader reads it back
    g = {"heads": jnp.ones((2, 4)).at[:, 1].set(0.0), "hidden": jnp.ones(32).at[3].set(0.0)}
    small = compact(params, g)
    assert small.config.head_dim == 8 and small.config.hidden_size == 31
    back = jp.load(jp.save(small, str(tmp_path / "heads")))
    assert maxdiff(logits(back), logits(params, g)) <= TOL


def test_param_count_excludes_embeddings_and_head():
    cfg = LLAMA["gqa-untied-bias"]
    params = init(cfg)
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    assert param_count(params) == total - 2 * 50 * 48
    opt = init(OPT["project-in-out"])
    total = sum(int(x.size) for x in jax.tree.leaves(opt))
    assert param_count(opt) == total - 50 * 20 - 18 * 32


def test_all_ones_and_no_gates_keep_everything():
    params = init(LLAMA["gqa"])
    for g in (None, {}, ones_like_model(params.config)):
        same = compact(params, g)
        assert same.config == params.config
        for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)


def test_bad_gates_are_rejected_clearly():
    params = init(LLAMA["gqa"])
    bad = [
        ({"heads": jnp.ones((2, 5))}, r"gates\['heads'\].*\[2, 6\]"),
        ({"heads": jnp.ones((3, 6))}, r"gates\['heads'\] has shape \[3, 6\]; this model needs \[2, 6\]"),
        ({"kv_heads": jnp.ones((2,))}, r"gates\['kv_heads'\] has shape \[2\]; this model needs \[2, 2\]"),
        ({"ffn": [jnp.ones(40)]}, r"list of 1 entries; the model has 2 layers"),
        ({"ffn": [jnp.ones(40), jnp.ones(39)]}, r"gates\['ffn'\]\[1\]: layer 1 needs \[40\]"),
        ({"attn": jnp.ones((2, 1))}, r"gates\['attn'\] has shape \[2, 1\]; this model needs \[2\]"),
        ({"hidden": jnp.ones(47)}, r"needs \[48\]"),
        ({"hidden": jnp.ones(48).at[3].set(0.5)}, r"must be binary.*0\.5"),
        ({"hidden": jnp.zeros(48)}, r"every hidden dimension"),
        ({"ffn": jnp.ones((2, 40)).at[0, 0].set(jnp.nan)}, r"non-finite"),
        ({"head": jnp.ones((2, 6))}, r"unknown gate keys"),
    ]
    for g, match in bad:
        with pytest.raises(jp.InvalidArgumentError, match=match):
            compact(params, g)
    with pytest.raises(jp.InvalidArgumentError, match="concrete"):
        jax.jit(lambda h: compact(params, {"heads": h}).tree["norm"]["scale"])(jnp.ones((2, 6)))
    with pytest.raises(jp.InvalidArgumentError, match="Params"):
        compact(params.tree, {})
    post = init(OPT["post-ln"])
    with pytest.raises(jp.InvalidArgumentError, match="post-LN.*attn gate.*0.5"):
        compact(post, {"attn": jnp.array([1.0, 0.5])})
    proj = init(OPT["project-in-out"])  # hidden 32 -> 20 = word_embed_proj_dim
    with pytest.raises(jp.InvalidArgumentError, match="word_embed_proj_dim"):
        compact(proj, {"hidden": jnp.ones(32).at[:12].set(0.0)})


def test_inconsistent_kv_groups_in_a_config_are_rejected():
    shapes = [{"n_heads": 4, "n_kv": 2, "ffn_dim": 8, "kv_groups": [3, 2]}, {"n_heads": 4, "n_kv": 2, "ffn_dim": 8}]
    d = {**LLAMA["gqa"].to_hf(), "jaxprune_layer_shapes": shapes}
    with pytest.raises(jp.InvalidArgumentError, match="summing to n_heads=4"):
        jp.LlamaConfig.from_hf(d)


def test_one_shot_pruning_runs_on_unequal_groups():
    """The calibration driver passes each layer's K/V grouping: dense-mode Wanda masks equal the
    masks from statistics gathered through the model's own forward (`input_stats`)."""
    cfg = jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2)
    params = init(cfg)
    small = compact(params, {"heads": jnp.array([[1, 1, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1]], jnp.float32)})
    assert [dict(d).get("kv_groups") for d in small.config.layer_shapes] == [(3, 2), (3, 1)]
    calib = jax.random.randint(jax.random.key(5), (2, 12), 0, 50)
    dense_mode = jp.wanda(small, calib, 0.5, mode="dense", show_progress=False)
    from_stats = jp.wanda(small, jp.input_stats(small, calib, "sumsq"), 0.5, show_progress=False)
    for a, b in zip(jax.tree.leaves(dense_mode), jax.tree.leaves(from_stats)):
        np.testing.assert_array_equal(a, b)
    for mode in ("sequential", "as-you-go"):
        pruned = jp.apply_masks(small, jp.wanda(small, calib, 0.5, mode=mode, show_progress=False))
        assert np.isfinite(np.asarray(jp.forward(pruned, calib))).all()
