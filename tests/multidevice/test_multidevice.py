"""Data parallelism, tensor-parallel params and user pmap/shard_map on 8 CPU devices.

Run by tests/test_distributed.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxprune as jp
from jaxprune.parallel import distributed
from jaxprune.calibration.capture import input_stats
from jaxprune.sparsity.masks import select_count
from jaxprune.sparsity.sparsegpt import prune_kernel

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

LLAMA = jp.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
OPT = jp.OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=8,
                   max_position_embeddings=64)


def meshes():
    """No mesh (one device), 8 devices data-parallel, and 4 x 2 data x tensor parallel (a mesh over
    a subset of the devices is covered by tests/workers/multihost_worker.py's 2 x 2 mesh)."""
    return {"1": None,
            "8": distributed.make_mesh(),
            "4x2": distributed.make_mesh(model=2)}


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module", params=["llama", "opt"])
def model(request):
    cfg = LLAMA if request.param == "llama" else OPT
    params = jp.init(cfg, jax.random.key(0))
    calib = np.asarray(jax.random.randint(jax.random.key(1), (16, 32), 0, cfg.vocab_size))
    return params, calib


def test_rules_split_heads_and_ffn():
    params = jp.init(LLAMA, jax.random.key(0))
    specs = distributed.param_specs(params, 2)
    layer = specs["layers"][0]
    assert layer["self_attn"]["q_proj"]["kernel"] == P(None, "model")
    assert layer["self_attn"]["k_proj"]["kernel"] == P(None, "model")
    assert layer["self_attn"]["o_proj"]["kernel"] == P("model", None)
    assert layer["mlp"]["up_proj"]["kernel"] == P(None, "model")
    assert layer["mlp"]["down_proj"]["kernel"] == P("model", None)
    assert specs["embed_tokens"]["embedding"] == P()
    # 4 K/V heads do not split over 8: replicated rather than cutting a head in half
    assert distributed.param_specs(params, 8)["layers"][0]["self_attn"]["k_proj"]["kernel"] == P()
    sharded = distributed.shard_params(params, distributed.make_mesh(model=2))
    q = sharded["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (64, 32)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_masks_identical_on_1_and_8_devices_and_4x2(model, method):
    params, calib = model
    out = {}
    for name, mesh in meshes().items():
        if method == "magnitude":
            masks = jp.magnitude(params, 0.5, mesh=mesh)
        else:
            masks = jp.wanda(params, calib, 0.5, mesh=mesh, batch_size=8)
        if mesh is not None:  # masks come back with the shardings of the (sharded) params
            placed = distributed.shard_params(params, mesh)
            for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(placed)):
                assert m.sharding == p.sharding
        out[name] = leaves(masks)
    for name in ("8", "4x2"):
        for a, b in zip(out["1"], out[name]):
            np.testing.assert_array_equal(a, b, err_msg=f"{method} on {name} devices")


def test_wanda_nm_and_sharded_params_in(model):
    params, calib = model
    mesh = distributed.make_mesh(model=2)
    ref = jp.wanda(params, calib, 0.5, pattern="2:4")
    got = jp.wanda(distributed.shard_params(params, mesh), calib, 0.5, pattern="2:4")   # mesh taken from params
    for a, b in zip(leaves(ref), leaves(got)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_sparsegpt_on_1_and_8_devices_and_4x2(model):
    """On Llama (OPT's layers shard by the same rules, and its Wanda masks are checked above)."""
    params, calib = model
    ref_p, ref_m = jp.sparsegpt(params, calib, 0.5, blocksize=32)
    for name, mesh in list(meshes().items())[1:]:
        new_p, masks = jp.sparsegpt(params, calib, 0.5, blocksize=32, mesh=mesh)
        ms = leaves(masks)
        agree = np.mean(np.concatenate([(a == b).ravel() for a, b in zip(leaves(ref_m), ms)]))
        assert agree > 0.999, (name, agree)
        for a, b in zip(leaves(ref_p), leaves(new_p)):
            np.testing.assert_allclose(a, b, atol=2e-3, err_msg=name)


def test_data_parallel_stats_shard_map_equals_single_device(model):
    params, calib = model
    mesh = distributed.make_mesh()
    for kind in ("sumsq", "hessian"):
        ref = input_stats(params, jnp.asarray(calib), kind)
        got = distributed.data_parallel_stats(params, calib, kind, mesh)
        assert float(got["count"]) == calib.size
        for k in ref["sums"]:
            r = np.asarray(ref["sums"][k])   # float32 sums in another order: tolerance on the scale of the entries
            np.testing.assert_allclose(np.asarray(got["sums"][k]), r, rtol=2e-5, atol=2e-6 * np.abs(r).max())


def test_user_pmap_of_wanda_on_per_device_statistics(model):
    """The acceptance: a user's pmap over 8 devices of jaxprune.wanda on per-device statistics."""
    params, calib = model
    per_device = calib.reshape(8, 2, calib.shape[1])

    def prune(tokens):
        stats = jax.lax.psum(jp.input_stats(params, tokens, "sumsq"), "devices")
        return jp.wanda(params, stats, sparsity=0.5)

    masks = jax.pmap(prune, axis_name="devices")(per_device)
    ref = jp.wanda(params, calib, 0.5, mode="dense")   # statistics of the unpruned model, one device
    for a, b in zip(leaves(ref), leaves(masks)):
        assert b.shape == (8,) + a.shape
        for d in range(8):
            np.testing.assert_array_equal(a, b[d])


def test_scoring_masking_sparsegpt_inside_user_pmap_and_shard_map():
    rng = np.random.default_rng(0)
    kernels = rng.normal(size=(8, 32, 16)).astype(np.float32)
    xs = rng.normal(size=(8, 64, 32)).astype(np.float32)
    hs = np.einsum("dti,dtj->dij", xs, xs)

    def one(kernel, x, h):
        keep_wanda = select_count(jp_criteria.wanda(kernel, jnp.mean(x * x, 0)), 8, None, "row")
        keep_nm = select_count(jp_criteria.magnitude(kernel), 16, (2, 4), "row")
        new, keep_gpt = prune_kernel(kernel, h, 0.5, blocksize=16)
        return keep_wanda, keep_nm, new, keep_gpt

    ref = [one(*a) for a in zip(kernels, xs, hs)]
    by_pmap = jax.pmap(one)(kernels, xs, hs)
    mesh = jax.make_mesh((8,), ("d",))
    per_device = [jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (kernels, xs, hs)]
    by_shard_map = jax.jit(jax.shard_map(lambda k, x, h: jax.tree.map(lambda a: a[None], one(k[0], x[0], h[0])),
                                         mesh=mesh, in_specs=P("d"), out_specs=P("d")))(*per_device)
    for got in (by_pmap, by_shard_map):
        for d in range(8):
            for r, g in zip(ref[d], got):
                np.testing.assert_allclose(np.asarray(r), np.asarray(g)[d], atol=1e-5)


def test_structured_utilities_and_l0_step_on_a_sharded_batch():
    """Bonsai/FinerCut utilities and an L0 step computed on a batch split over 8 devices equal
    the single-device values."""
    from jaxprune.structured import units as structured
    from jaxprune.structured import l0
    from jaxprune.structured.finercut import _dense_logprobs, _mean_jsd
    from jaxprune.structured.utility import evaluate, perplexity_utility
    params = jp.init(LLAMA, jax.random.key(0))
    windows = np.asarray(jax.random.randint(jax.random.key(1), (16, 32), 0, LLAMA.vocab_size))
    mesh = distributed.make_mesh()
    sharded = distributed.shard_batch(windows, mesh)
    assert sharded.sharding == NamedSharding(mesh, P("data"))

    gates = structured.ones(LLAMA, ("heads", "ffn"))
    stacked = jax.tree.map(lambda g: jnp.stack([g, g.at[..., 0].set(0.0)]), gates)
    ref = evaluate(perplexity_utility(jnp.asarray(windows), log=True), params, stacked)
    got = evaluate(perplexity_utility(sharded, log=True), params, stacked)
    np.testing.assert_allclose(got, ref, rtol=1e-5)

    fc_gates = {"attn": jnp.ones(2).at[1].set(0.0), "mlp": jnp.ones(2)}
    ref_j = _mean_jsd(params, jnp.asarray(windows), _dense_logprobs(params, jnp.asarray(windows)), fc_gates)
    got_j = _mean_jsd(params, sharded, _dense_logprobs(params, sharded), fc_gates)
    np.testing.assert_allclose(float(got_j), float(ref_j), rtol=1e-4)

    targets = l0.size_targets(params, 0.3)
    trainable = {"params": params.tree, "log_alphas": l0.init_log_alphas(LLAMA),
                 "lambdas": {k: jnp.ones(2) for k in targets}}
    optimizer = l0.l0_optimizer()
    step = l0.l0_step(optimizer, config=LLAMA, targets=targets, warmup=10)
    opt_state = optimizer.init(trainable)
    key = jax.random.key(3)
    t1, _, m1 = step(trainable, opt_state, jnp.asarray(windows[:8]), key, 0)
    t8, _, m8 = step(trainable, opt_state, distributed.shard_batch(windows[:8], mesh), key, 0)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(leaves(t1), leaves(t8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

from jaxprune.sparsity import criteria as jp_criteria  # noqa: E402  (used inside the pmapped function)


def test_structured_methods_accept_sharded_params():
    """Bonsai and FinerCut on tensor-parallel params and a data-sharded batch choose what they choose
    on one device."""
    params = jp.init(LLAMA, jax.random.key(0))
    windows = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, LLAMA.vocab_size))
    mesh = distributed.make_mesh(model=2)
    sharded, batch = distributed.shard_params(params, mesh), distributed.shard_batch(windows, mesh)
    ref = jp.finercut(params, windows, n_remove=2)
    got = jp.finercut(sharded, batch, n_remove=2)
    assert ref.order == got.order
    ref_b = jp.bonsai(params, windows, target=0.1, n_samples=4, key=jax.random.key(0), show_progress=False)
    got_b = jp.bonsai(sharded, batch, target=0.1, n_samples=4, key=jax.random.key(0), show_progress=False)
    for k in ref_b.gates:
        np.testing.assert_array_equal(np.asarray(ref_b.gates[k]), np.asarray(got_b.gates[k]))


def _family_configs():
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    return {
        "gemma2": jp.Gemma2Config(**common, head_dim_override=8, query_pre_attn_scalar=8, sliding_window=8,
                                  attn_logit_softcapping=5.0, final_logit_softcapping=10.0),
        "gemma3": jp.Gemma3Config(**common, head_dim_override=8, query_pre_attn_scalar=8, sliding_window=8,
                                  layer_types=("sliding_attention", "full_attention")),
        "qwen2": jp.Qwen2Config(**common),
        "qwen3": jp.Qwen3Config(**common, head_dim_override=8),
        "mistral": jp.MistralConfig(**common, sliding_window=8),
    }


# Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Gemma 3 (q/k norms, four norms per layer, sliding and
# full layers): Gemma 2's and Mistral's layouts add nothing the three do not place.
@pytest.mark.parametrize("name", ["gemma3", "qwen2", "qwen3"])
def test_every_family_prunes_sharded_like_one_device(name):
    """Wanda on a 4 x 2 data x tensor mesh (q/k/v/gate/up split by output, o/down by input, biases
    and q/k norms placed by the Layout) gives the one-device masks, and the masks keep the params' shardings."""
    cfg = _family_configs()[name]
    params = jp.init(cfg, jax.random.key(0))
    calib = np.asarray(jax.random.randint(jax.random.key(1), (16, 32), 0, cfg.vocab_size))
    ref = jp.wanda(params, calib, sparsity=0.5, show_progress=False)
    mesh = distributed.make_mesh(model=2)
    sharded = distributed.shard_params(params, mesh)
    got = jp.wanda(sharded, calib, sparsity=0.5, show_progress=False)
    for a, b in zip(leaves(ref), leaves(got)):
        assert (a == b).all()
    q = got["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "model")
