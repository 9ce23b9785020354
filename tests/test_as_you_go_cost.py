"""As-you-go costs one forward: the staged passes of a layer (`LayerPruner.stages`) do the work of one
forward of it, counted by XLA's own FLOP estimate of the compiled programs. Finished stages' modules
compute from their cached inputs, and a module writing the residual stream (o_proj, fc2) is computed
once and its output reused, so no matmul runs twice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import models
from jaxprune.calibration import driver
from jaxprune.oneshot.pruning import WandaRule


def flops(jitted, *args, **static) -> float:
    return float(jitted.lower(*args, **static).compile().cost_analysis()["flops"])


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_staged_as_you_go_costs_one_forward(arch, monkeypatch):
    D, F = 64, 256
    if arch == "llama":
        cfg = jp.LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = jp.OPTConfig(vocab_size=64, hidden_size=D, ffn_dim=F, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=D)
    params = models.init(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 32)), jnp.int32)
    X, ctx = driver.embed_chunks(params, tokens, 2)
    lp = params.tree["layers"][0]
    pruner = driver.LayerPruner(cfg, "sumsq", WandaRule(), mode="as-you-go")
    target = frozenset(l.path for l in models.layout_of(cfg).linears)
    assert pruner.stages(lp, X[0], ctx, None, target) is not None   # the staged path runs

    staged = []
    real = driver._stage_pass_jit

    def counting(*args, **static):
        staged.append(flops(real, *args, **static))
        return real(*args, **static)

    monkeypatch.setattr(driver, "_stage_pass_jit", counting)
    pruner.step(lp, X, ctx, None, 0.5, target, jnp.asarray(float(tokens.size)))
    forward = sum(flops(driver._run_jit, lp, x, ctx, config=cfg, kg=None) for x in X)
    output_projection = 2 * tokens.size * D * D   # one o_proj / out_proj matmul over all tokens
    # the passes add the statistics (sums of squares of the inputs) to one forward, a few percent of
    # it here; computing the output projection twice would add a whole matmul
    assert forward <= sum(staged) < forward + output_projection / 2, (sum(staged), forward)
