"""Structured units: the prior against activations captured from transformers' torch model,
unit costs against the parameter counts of compacted models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.structured import units as structured
from jaxprune.models.config import config_from_hf
from jaxprune.io.hf import from_named_arrays

from conftest import hf_to_named, tiny_llama, tiny_opt
from test_pruning import capture_inputs


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_prior_matches_torch_activations(family):
    model = tiny_llama(num_attention_heads=4, num_key_value_heads=2) if family == "llama" else tiny_opt()
    params = from_named_arrays(config_from_hf(model.config.to_dict()), hf_to_named(model))
    cfg = params.config
    calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 10))
    out_name, down_name = ("self_attn.o_proj", "mlp.down_proj") if family == "llama" else ("self_attn.out_proj", "fc2")
    kinds = ("heads", "kv_heads", "ffn") if family == "llama" else ("heads", "ffn")
    got = structured.prior(params, calib, kinds)
    H = cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        X = capture_inputs(model, calib, i, [out_name, down_name])
        layer = (model.model.layers if family == "llama" else model.model.decoder.layers)[i]
        W_o = layer.get_submodule(out_name).weight.detach().double().numpy()    # [out, in]
        W_d = layer.get_submodule(down_name).weight.detach().double().numpy()
        feat_o = np.sqrt((X[out_name] ** 2).mean(0)) * np.linalg.norm(W_o, axis=0)
        heads = feat_o.reshape(H, -1).sum(1)
        np.testing.assert_allclose(got["heads"][i], heads, rtol=1e-4)
        ffn = np.sqrt((X[down_name] ** 2).mean(0)) * np.linalg.norm(W_d, axis=0)
        np.testing.assert_allclose(got["ffn"][i], ffn, rtol=1e-4)
        if "kv_heads" in kinds:
            kv = cfg.num_key_value_heads
            np.testing.assert_allclose(got["kv_heads"][i], heads.reshape(kv, -1).sum(1), rtol=1e-4)


def test_prior_is_zero_for_gated_units():
    cfg = jp.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    params = jp.init(cfg, jax.random.key(0))
    g = {"heads": jnp.ones((2, 4)).at[1, 2].set(0.0), "ffn": jnp.ones((2, 40)).at[0, :5].set(0.0)}
    pri = structured.prior(params, jnp.ones((1, 6), jnp.int32), ("heads", "ffn"), gates=g)
    assert float(pri["heads"][1, 2]) == 0.0 and np.all(np.asarray(pri["ffn"][0, :5]) == 0.0)
    assert np.all(np.asarray(pri["ffn"][0, 5:]) > 0)


CONFIGS = {
    "llama-gqa": jp.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                num_attention_heads=6, num_key_value_heads=2, attention_bias=True),
    "llama-mha": jp.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, mlp_bias=True),
    "opt": jp.OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unit_costs_equal_parameters_removed_by_compaction(name):
    cfg = CONFIGS[name]
    params = jp.init(cfg, jax.random.key(0))
    dense = structured.non_embedding_params(params)
    shapes = structured.gate_shapes(cfg)

    def removed(kind, index):
        g = {kind: jnp.ones(shapes[kind]).at[index].set(0.0)}
        return dense - structured.non_embedding_params(jp.compact(params, g))

    for kind, index in [("ffn", (1, 3)), ("kv_heads", (0, 1)), ("attn", 1), ("mlp", 0), ("layer", 1)]:
        assert removed(kind, index) == structured.unit_costs(params, kind)[index], kind
    H = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or H
    G = H // kv
    # all G query heads of one group together cost exactly what the K/V group costs
    g = {"heads": jnp.ones(shapes["heads"]).at[0, :G].set(0.0)}
    assert dense - structured.non_embedding_params(jp.compact(params, g)) == pytest.approx(
        G * structured.unit_costs(params, "heads")[0, 0])
    assert structured.unit_costs(params, "kv_heads")[0, 0] == pytest.approx(G * structured.unit_costs(params, "heads")[0, 0])
    if G > 1:  # a single head of a group: its q/o rows only (the group's k/v stay)
        share = structured.unit_costs(params, "heads")[0, 0]
        g = {"heads": jnp.ones(shapes["heads"]).at[0, 0].set(0.0)}
        got = dense - structured.non_embedding_params(jp.compact(params, g))
        assert got < share
    D = cfg.hidden_size
    g = {"hidden": jnp.ones((D,)).at[5].set(0.0)}
    assert dense - structured.non_embedding_params(jp.compact(params, g)) == structured.unit_costs(params, "hidden")[5]


def test_unit_kind_errors():
    params = jp.init(CONFIGS["opt"], jax.random.key(0))
    with pytest.raises(jp.InvalidArgumentError):
        structured.unit_costs(params, "neurons")
    with pytest.raises(jp.InvalidArgumentError):
        structured.prior(params, jnp.ones((1, 4), jnp.int32), ("attn",))
