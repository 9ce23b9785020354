"""Compile once: repeated pruning calls on same-shaped params compile no new XLA program, and
per-layer sparsities (OWL) do not compile the pruning pass once per layer.

Compilations are counted with a `jax.monitoring` listener on JAX's backend-compile event
(recorded once per XLA program actually compiled, eager ops included; cache hits record
nothing). The listener is removed after each count, and no JAX config is changed."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Yields a list that receives the name of every program compiled inside the block."""
    names: list[str] = []

    def listener(event, duration_secs, **kw):
        if event == BACKEND_COMPILE:
            names.append(kw.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def tiny(layers: int = 2, seed: int = 0):
    cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return jp.init(cfg, jax.random.key(seed))


def calib(n: int = 4, seqlen: int = 16, seed: int = 1):
    return jax.random.randint(jax.random.key(seed), (n, seqlen), 0, 64).astype(jnp.int32)


def test_counter_sees_compilations():
    """The counter itself works: a fresh jitted function compiles once, then hits the cache."""
    f = jax.jit(lambda x: x * 3 + 1)
    x = jnp.arange(7.0)
    with count_compiles() as first:
        f(x).block_until_ready()
    with count_compiles() as second:
        f(x).block_until_ready()
    assert len(first) == 1 and second == []


@pytest.mark.parametrize("mode", ["sequential", "as-you-go", "dense"])
def test_second_wanda_call_compiles_nothing(mode):
    params, tokens = tiny(), calib()
    first = jp.wanda(params, tokens, sparsity=0.5, mode=mode)
    other = tiny(seed=5)        # same shapes, other values
    with count_compiles() as names:
        again = jp.wanda(other, calib(seed=7), sparsity=0.5, mode=mode)
        jax.block_until_ready(again.tree)
    assert names == [], f"the second wanda call compiled {len(names)} programs: {names}"
    assert jp.sparsity_summary(again)["pruned_sparsity"] == pytest.approx(
        jp.sparsity_summary(first)["pruned_sparsity"])


def test_wanda_other_sparsity_compiles_nothing():
    params, tokens = tiny(), calib()
    jp.wanda(params, tokens, sparsity=0.5)
    with count_compiles() as names:
        jax.block_until_ready(jp.wanda(params, tokens, sparsity=0.3).tree)
    assert names == [], f"a new sparsity compiled {len(names)} programs: {names}"


def test_second_wanda_from_stats_compiles_nothing():
    params, tokens = tiny(), calib()
    stats = jp.input_stats(params, tokens, "sumsq")
    jp.wanda(params, stats, sparsity=0.5)
    with count_compiles() as names:
        jax.block_until_ready(jp.wanda(params, stats, sparsity=0.4).tree)
    assert names == [], names


def test_per_layer_sparsities_compile_each_kernel_shape_once():
    """30 distinct per-layer sparsities compile exactly the programs one uniform sparsity does."""
    params, tokens = tiny(layers=30), calib()
    sparsities = list(np.linspace(0.2, 0.8, 30))
    assert len(set(sparsities)) == 30
    jax.clear_caches()
    with count_compiles() as uniform:
        jax.block_until_ready(jp.wanda(params, tokens, sparsity=0.5).tree)
    jax.clear_caches()
    with count_compiles() as per_layer:
        masks = jp.wanda(params, tokens, per_layer_sparsity=sparsities)
        jax.block_until_ready(masks.tree)
    assert len(per_layer) == len(uniform), (
        f"{len(per_layer)} programs for 30 sparsities vs {len(uniform)} for one: {sorted(per_layer)}")
    # and the per-layer targets are honoured: q_proj [32, 32] prunes int(32 * s) of each row
    for i, s in enumerate(sparsities):
        keep = np.asarray(masks.tree["layers"][i]["self_attn"]["q_proj"]["kernel"])
        assert (~keep).sum(axis=0).tolist() == [int(32 * s)] * 32


def test_second_magnitude_call_compiles_nothing():
    params = tiny()
    jp.magnitude(params, sparsity=0.5)
    with count_compiles() as names:
        jax.block_until_ready(jp.magnitude(tiny(seed=3), sparsity=0.25).tree)
        jax.block_until_ready(jp.magnitude(params, sparsity=0.5, scope="row").tree)
    # scope='row' is a new static selection: compiled once here, at most one program per kernel shape
    with count_compiles() as again:
        jax.block_until_ready(jp.magnitude(params, sparsity=0.5, scope="row").tree)
        jax.block_until_ready(jp.magnitude(params, sparsity=0.5).tree)
    assert again == [], again


def test_owl_sparsities_twice_compiles_nothing():
    params, tokens = tiny(), calib()
    first = jp.owl_sparsities(params, tokens, 0.5)
    with count_compiles() as names:
        second = jp.owl_sparsities(params, tokens, 0.5)
    assert names == [], names
    assert first == second


def test_owl_then_wanda_compiles_each_kernel_shape_once():
    """OWL's per-layer sparsities on a deeper model: the pruning pass compiles once for all layers."""
    params, tokens = tiny(layers=6), calib()
    per_layer = jp.owl_sparsities(params, tokens, 0.5)
    jp.wanda(params, tokens, sparsity=0.5)
    with count_compiles() as names:
        jax.block_until_ready(jp.wanda(params, tokens, per_layer_sparsity=per_layer).tree)
    assert names == [], names


def test_second_sparsegpt_call_compiles_nothing():
    params, tokens = tiny(), calib()
    jp.sparsegpt(params, tokens, sparsity=0.5)
    with count_compiles() as names:
        new, masks = jp.sparsegpt(params, tokens, sparsity=0.4)
        jax.block_until_ready((new.tree, masks.tree))
    assert names == [], names


def test_second_lora_and_l0_runs_compile_nothing():
    """The training steps are module-level jitted functions: a second run with the default
    optimiser and the same settings reuses the compiled step (L0's targets and starting sizes are
    static, so the L0 rerun keeps its key: other initial gates compile their step once)."""
    params, tokens = tiny(), calib()
    masks = jp.magnitude(params, sparsity=0.5)
    pruned = jp.apply_masks(params, masks)
    kw = dict(masks=masks, rank=4, steps=2, batch_size=2, show_progress=False)
    jp.lora_finetune(pruned, tokens, key=jax.random.key(0), **kw)
    l0kw = dict(target=0.3, steps=2, batch_size=2, show_progress=False, key=jax.random.key(0))
    jp.l0_prune(params, tokens, **l0kw)
    with count_compiles() as names:
        jp.lora_finetune(pruned, tokens, key=jax.random.key(3), **kw)
        jp.l0_prune(params, tokens, **l0kw)
    assert names == [], names


def test_second_generation_compiles_nothing():
    from jaxprune.evaluation import harness
    params = tiny()
    out1, _ = harness.generate_ids(params, [[1, 2, 3], [4]], 5, batch_size=2)
    with count_compiles() as names:
        out2, seconds = harness.generate_ids(params, [[1, 2, 3], [4]], 5, batch_size=2)
    assert names == [] and out1 == out2 and seconds > 0


def test_utility_evaluate_compiles_once_per_utility():
    from jaxprune.structured import utility
    params = tiny()
    u = utility.perplexity_utility(calib(n=2, seqlen=8))
    g = {"ffn": jnp.ones((4, 2, 64)).at[1, 0, :32].set(0.0)}
    first = utility.evaluate(u, params, g, batch_size=2)
    other = {"ffn": g["ffn"][::-1]}
    with count_compiles() as names:
        again = utility.evaluate(u, params, other, batch_size=2)
    assert names == [], names
    np.testing.assert_allclose(again, first[::-1], rtol=1e-6)
