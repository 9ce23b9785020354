"""Every method on every family: one tiny random model per family (Llama, OPT, Gemma 2, Gemma 3,
Qwen2, Qwen3, Mistral) through magnitude, Wanda, SparseGPT (unstructured and 2:4), Bonsai,
FinerCut, L0, LoRA, compaction, save/load, streaming, and transformers loading the exported
uniform result with matching logits."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import jaxprune as jp
from jaxprune.structured.compact import effective_gates
from jaxprune.models.gemma import Gemma2Config, Gemma3Config
from jaxprune.models.mistral import MistralConfig
from jaxprune.models.qwen import Qwen2Config, Qwen3Config

_GQA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2)

FAMILIES = {
    "llama": lambda: jp.LlamaConfig(**_GQA),
    "opt": lambda: jp.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=64),
    "gemma2": lambda: Gemma2Config(**_GQA, head_dim_override=8, query_pre_attn_scalar=8, sliding_window=6,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=10.0),
    "gemma3": lambda: Gemma3Config(**_GQA, head_dim_override=8, query_pre_attn_scalar=8, sliding_window=6,
                                   layer_types=("sliding_attention", "sliding_attention", "full_attention")),
    "qwen2": lambda: Qwen2Config(**_GQA),
    "qwen3": lambda: Qwen3Config(**_GQA, head_dim_override=8),
    "mistral": lambda: MistralConfig(**_GQA, sliding_window=6),
}
T = 16   # longer than every sliding window above


def _params(name):
    cfg = FAMILIES[name]()
    p = jp.init(cfg, jax.random.key(0))
    # Random biases and norm weights too (init's norms are ~1, and biases would hide nothing).
    leaves, treedef = jax.tree.flatten(p.tree)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return p.replace(jax.tree.unflatten(treedef, leaves))


def _calib(cfg, n=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, T)), jnp.int32)


def _kernel_masks(masks):
    return [(jax.tree_util.keystr(k), np.asarray(m)) for k, m in jax.tree_util.tree_flatten_with_path(masks)[0]
            if jax.tree_util.keystr(k).endswith("['kernel']") and "layers" in jax.tree_util.keystr(k)]


def _close(a, b, atol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=0)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, _params(request.param)


def test_one_shot_methods(family):
    name, params = family
    calib = _calib(params.config)
    x = _calib(params.config, 2, seed=1)
    for masks in (jp.magnitude(params, sparsity=0.5), jp.wanda(params, calib, sparsity=0.5, batch_size=2),
                  jp.wanda(params, calib, sparsity=0.5, pattern="2:4", batch_size=2)):
        ks = _kernel_masks(masks)
        assert ks, name
        for path, m in ks:
            assert m.mean() == pytest.approx(0.5), (name, path)
        assert np.isfinite(np.asarray(jp.forward(jp.apply_masks(params, masks), x))).all()
    new, masks = jp.sparsegpt(params, calib, sparsity=0.5, pattern="2:4", batch_size=2)
    for path, m in _kernel_masks(masks):
        groups = m.reshape(-1, 4, m.shape[1]).sum(axis=1)     # N:M along the input axis
        assert (groups == 2).all(), (name, path)
    pruned = jp.apply_masks(new, masks)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), pruned, new))   # zeros kept
    dense_ppl = jp.perplexity(params, x, seqlen=T)
    assert np.isfinite(jp.perplexity(pruned, x, seqlen=T)) and np.isfinite(dense_ppl)


# L0 and LoRA train through the forward: run on the families whose layers differ (plain, biased
# post-LN OPT, Gemma 2's post-norms and soft-capping, Qwen 3's q/k norms), not on all seven.
TRAINED_FAMILIES = ("llama", "opt", "gemma2", "qwen3")


def test_structured_methods_and_compaction(family):
    name, params = family
    calib = _calib(params.config)
    x = _calib(params.config, 2, seed=1)
    b = jp.bonsai(params, calib, target=0.2, n_samples=4, step=0.2, key=jax.random.key(0), submodels_per_batch=4,
                  show_progress=False)
    assert b.removed_fraction >= 0.2 - 0.05
    small = jp.compact(params, b.gates)
    _close(jp.forward(small, x), jp.forward(params, x, effective_gates(params, b.gates)))
    f = jp.finercut(params, calib, n_remove=2, submodels_per_batch=4, show_progress=False)
    assert len(f.order) == 2
    _close(jp.forward(jp.compact(params, f.gates), x), jp.forward(params, x, f.gates))
    if name not in TRAINED_FAMILIES:   # the others' layers repeat these (their structure is covered above)
        return
    r = jp.l0_prune(params, calib, target=0.3, steps=4, warmup=2, batch_size=2, key=jax.random.key(0),
                    show_progress=False)
    assert 0.0 < r.removed_fraction
    assert np.isfinite(np.asarray(jp.forward(jp.compact(r.params, r.gates), x))).all()
    masks = jp.wanda(params, calib, sparsity=0.5, batch_size=2)
    lo = jp.lora_finetune(jp.apply_masks(params, masks), calib, masks, rank=2, steps=2, batch_size=2,
                          key=jax.random.key(0), show_progress=False)
    merged = jp.lora_merge(jp.apply_masks(params, masks), lo.adapters, masks)
    leaves = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(merged)[0])
    for path, m in _kernel_masks(masks):
        assert (np.asarray(leaves[path])[~m] == 0).all(), (name, path)


def _uniform_gates(cfg):
    """Remove one K/V group's worth of heads uniformly and a third of every FFN (a uniform result)."""
    L, H, KV, F = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    g = {"ffn": jnp.ones((L, F)).at[:, : F // 3].set(0.0)}
    if cfg.arch == "opt":
        return g      # transformers' OPT needs hidden_size == heads x head_dim
    if KV < H:
        g["kv_heads"] = jnp.ones((L, KV)).at[:, 0].set(0.0)
    else:
        g["heads"] = jnp.ones((L, H)).at[:, 0].set(0.0)
    return g


def test_save_load_and_transformers_loads_the_compacted_model(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name, params = family
    x = _calib(params.config, 2, seed=1)
    small = jp.compact(params, _uniform_gates(params.config))
    assert small.config.layer_shapes is None
    out = str(tmp_path / name)
    jp.save(small, out)
    back = jp.load(out)
    _close(jp.forward(back, x), jp.forward(small, x), atol=1e-6)
    _close(jp.forward(small, x), jp.forward(params, x, _uniform_gates(params.config)))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        ref = model(torch.tensor(np.asarray(x), dtype=torch.long)).logits.numpy()
    _close(jp.forward(small, x), ref)


def test_streaming_equals_in_memory(family, tmp_path):
    from jaxprune.oneshot import streaming
    name, params = family
    calib = np.asarray(_calib(params.config))
    src = str(tmp_path / "dense")
    jp.save(params, src)
    out = streaming.prune_streaming(src, str(tmp_path / "pruned"), calib, "wanda", 0.5, batch_size=2,
                                    show_progress=False)
    streamed = dict(_kernel_masks(jp.load_masks(out)))
    for path, m in _kernel_masks(jp.wanda(params, jnp.asarray(calib), sparsity=0.5, batch_size=2)):
        assert (streamed[path] == m).all(), (name, path)
