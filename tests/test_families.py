"""Gemma 2, Gemma 3, Qwen2, Qwen3 and Mistral: logit parity with transformers (PyTorch, float32)
for checkpoints written by `save_pretrained` and loaded with `jp.load`, gates, `jp.save` round trips,
and windowed / soft-capped attention against a dense reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.models.layers import causal_attention
from jaxprune.models.layout import layout_of

from conftest import torch_logits

TOL = 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# name -> (transformers config class, its kwargs, jaxprune arch, sequence length)
CASES = {
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=1.5), "gemma2", 24),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        rope_theta=5000.0, rope_local_base_freq=100.0,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0},
                                        final_logit_softcapping=3.0, tie_word_embeddings=False,
                                        attn_logit_softcapping=2.0), "gemma3", 24),  # not applied, as in HF
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                                  max_window_layers=1, tie_word_embeddings=True), "qwen2", 24),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, head_dim=24), "qwen3", 24),
    # longer than one attention chunk (128): later chunks skip the key blocks before their window
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=8), "mistral", 150),
}

_MODELS = {"Gemma2Config": "Gemma2ForCausalLM", "Gemma3TextConfig": "Gemma3ForCausalLM",
           "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM", "MistralConfig": "MistralForCausalLM"}


def tokens(T, B=2, seed=0):
    return np.random.default_rng(seed).integers(0, COMMON["vocab_size"], (B, T)).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    """(name, torch model, its save_pretrained directory): every parameter perturbed (HF starts
    norms at 0 or 1, which would hide a wrong norm offset)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg_name, kw, _, _ = CASES[request.param]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**COMMON, **kw, attn_implementation="eager")
    model = getattr(transformers, _MODELS[cfg_name])(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return request.param, model, str(d)


def test_logits_match_transformers(hf_case):
    name, model, d = hf_case
    params = jp.load(d)
    assert params.config.arch == CASES[name][2]
    x = tokens(CASES[name][3])
    ref = torch_logits(model, x)
    got = np.asarray(jp.forward(params, x))
    diff = float(np.abs(got - ref).max())
    print(f"{name}: max |diff| = {diff:.2e}")
    assert diff <= TOL, diff


def test_save_reloads_in_transformers(hf_case, tmp_path):
    transformers = pytest.importorskip("transformers")
    name, model, d = hf_case
    params = jp.load(d)
    out = jp.save(params, str(tmp_path / "out"))
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(again) is type(model)
    x = tokens(CASES[name][3], B=1, seed=1)
    np.testing.assert_allclose(torch_logits(again, x), torch_logits(model, x), atol=TOL, rtol=0)
    assert jp.load(out).config == params.config


def test_layouts_name_every_layer_leaf(hf_case):
    name, _, d = hf_case
    params = jp.load(d)
    lay = layout_of(params.config)
    assert lay.name == params.config.arch
    for path, leaf in jax.tree_util.tree_flatten_with_path(params.tree["layers"][0])[0]:
        keys = tuple(k.key for k in path)
        roles = lay.leaf_roles(keys)   # raises for a leaf the layout does not know
        assert len(roles) == leaf.ndim
    for kind in ("attn", "mlp"):
        assert set(lay.sublayer_keys(kind)) <= set(params.tree["layers"][0])
    assert set(lay.sublayer_keys("attn")) | set(lay.sublayer_keys("mlp")) == set(params.tree["layers"][0])


def _random_params(cfg, seed):
    """Params ~ N(0, 0.1), norm weights 0.3 + N(0, 0.1) (Gemma: scale (1 + w) ~ 1.3); numpy, no compilations."""
    from jaxprune import models
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        v = 0.1 * rng.standard_normal(shape).astype(np.float32)
        return jnp.asarray(v + 0.3 if path[-1].key == "scale" else v)

    return jp.Params(cfg, jax.tree_util.tree_map_with_path(leaf, models.shapes(cfg), is_leaf=models.is_shape))


def _edit(params, i, path, fn):
    tree = jax.tree.map(np.array, params.tree)
    node = tree["layers"][i]
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = fn(node[path[-1]])
    return params.replace(jax.tree.map(jnp.asarray, tree))


def _zero_rows(lo, hi):
    def f(w):
        w[lo:hi] = 0
        return w
    return f


def test_gemma2_gates_equal_weights_zeroed_by_hand():
    """Post-norms sit after o_proj / down_proj: a head, K/V group or FFN gate still equals zeroing
    that unit's input rows of the output projection, and a sublayer gate equals removing it."""
    from jaxprune.models.gemma import Gemma2Config
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim_override=8, query_pre_attn_scalar=8,
                       sliding_window=4, attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
    p = _random_params(cfg, 0)
    x = tokens(12)
    Dh = cfg.head_dim
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    # layer 0: attention removed by its gate, FFN channels 5-8 gated; layer 1: MLP removed, query head 2
    # and K/V group 0 (query heads 0, 1) gated. One gated and one reference compilation.
    g = {"heads": jnp.ones((2, 4)).at[1, 2].set(0.0), "kv_heads": jnp.ones((2, 2)).at[1, 0].set(0.0),
         "ffn": jnp.ones((2, 48)).at[0, 5:9].set(0.0), "attn": jnp.array([0.0, 1.0]), "mlp": jnp.array([1.0, 0.0])}
    ref = _edit(p, 1, ("self_attn", "o_proj", "kernel"), _zero_rows(0, 3 * Dh))
    ref = _edit(ref, 0, ("mlp", "down_proj", "kernel"), _zero_rows(5, 9))
    attn_keys = set(layout_of(cfg).sublayer_keys("attn"))
    layers = ref.tree["layers"]
    ref = ref.replace({**ref.tree, "layers": [{k: v for k, v in layers[0].items() if k not in attn_keys},
                                              {k: v for k, v in layers[1].items() if k in attn_keys}]})
    close(jp.forward(p, x, g), jp.forward(ref, x))


def test_gemma_hidden_gate_equals_model_sliced_to_kept_dims():
    """embed_scale stays sqrt(original hidden size) when the hidden width is sliced."""
    import dataclasses
    from jaxprune.models.gemma import Gemma3Config
    cfg = Gemma3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim_override=8, query_pre_attn_scalar=8,
                       sliding_window=4, layer_types=("sliding_attention", "full_attention"))
    p = _random_params(cfg, 1)
    keep = np.ones(32, bool)
    keep[[3, 7, 8, 20]] = False
    sliced_cfg = dataclasses.replace(cfg, hidden_size=int(keep.sum()))
    assert sliced_cfg.embed_scale == cfg.embed_scale and sliced_cfg.head_dim == 8

    def slice_leaf(path, w):
        keys = [getattr(k, "key", None) for k in path]
        w = np.asarray(w)
        if keys[-2] in ("q_norm", "k_norm"):
            return w
        if keys[-1] == "embedding" or keys[-2] in ("o_proj", "down_proj"):
            return w[:, keep]
        return w[keep]

    ref = jp.Params(sliced_cfg, jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(slice_leaf, p.tree)))
    x = tokens(12)
    np.testing.assert_allclose(np.asarray(jp.forward(p, x, {"hidden": jnp.asarray(keep, jnp.float32)})),
                               np.asarray(jp.forward(ref, x)), atol=1e-5, rtol=0)
    # a compacted hidden size keeps its embed_scale through config.json
    again = type(cfg).from_hf(sliced_cfg.to_hf())
    assert again == sliced_cfg and sliced_cfg.to_hf()["jaxprune_embed_scale"] == cfg.embed_scale


def _dense_attention(q, k, v, scale, window, softcap):
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    t, j = np.arange(q.shape[1])[:, None], np.arange(q.shape[1])[None, :]
    ok = (j <= t) & ((t - j < window) if window is not None else True)
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("window,softcap,chunk", [(None, None, 4), (1, None, 4), (5, 2.0, 4), (8, None, 3),
                                                  (40, 1.0, 8), (6, None, 128)])
def test_windowed_softcapped_attention_equals_dense_reference(window, softcap, chunk):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 19, n, 8)).astype(np.float32) for n in (4, 2, 2))
    attend = jax.jit(lambda q, k, v: causal_attention(q, k, v, 0.5, chunk=chunk, window=window, softcap=softcap))
    got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(got), _dense_attention(q, k, v, 0.5, window, softcap), atol=1e-5, rtol=0)


def test_mixed_layer_types_need_the_layer_type():
    from jaxprune import models
    from jaxprune.models import gemma
    from jaxprune.models.gemma import Gemma2Config
    cfg = Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, sliding_window=4)
    p = jp.Params(cfg, jax.tree.map(jnp.zeros, models.shapes(cfg), is_leaf=models.is_shape))
    x, ctx = models.embed(p, jnp.zeros((1, 6), jnp.int32))
    with pytest.raises(jp.InvalidArgumentError, match="layer_type"):
        gemma.layer(cfg, p.tree["layers"][0], x, ctx, {})


@pytest.mark.parametrize("d,match", [
    (dict(model_type="gemma3"), "only the text model"),
    (dict(model_type="gemma2", layer_types=["chunked_attention"] * 2), "chunked_attention"),
    (dict(model_type="gemma2", layer_types=["full_attention"]), "layer_types has 1 entries"),
    (dict(model_type="gemma2", use_bidirectional_attention=True), "bidirectional"),
])
def test_unsupported_configs_are_rejected(d, match):
    from jaxprune.models.config import config_from_hf
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises((jp.UnsupportedModelError, jp.InvalidArgumentError), match=match):
        config_from_hf({**base, **d})


def test_config_spellings():
    """Gemma 3's transformers-4 spelling (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern) reads the same as transformers 5's rope_parameters per layer type."""
    from jaxprune.models.config import config_from_hf
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
                head_dim=8, model_type="gemma3_text")
    old = config_from_hf({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 3,
                          "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    new = config_from_hf({**base, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
                          "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert old == new and new.rope_for("full_attention") == (1e6, {"rope_type": "linear", "factor": 8.0})
    assert new.rope_for("sliding_attention") == (1e4, None) and new.window_for("sliding_attention") == 4096
    q = config_from_hf({**base, "model_type": "qwen2", "num_hidden_layers": 3, "use_sliding_window": True,
                        "sliding_window": 16, "max_window_layers": 2})
    assert q.layer_types == ("full_attention",) * 2 + ("sliding_attention",) and q.window_for(q.layer_type(2)) == 16
    m = config_from_hf({**base, "model_type": "mistral", "sliding_window": None})
    assert m.attention_kinds == ("full_attention",)
