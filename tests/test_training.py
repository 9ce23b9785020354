"""Masks in optax training loops (keep_masked) and LoRA recovery: pruned weights stay exactly zero
under Adam with weight decay; LoRA merges exactly and keeps unstructured and N:M sparsity."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import models
from jaxprune.errors import InvalidArgumentError
from jaxprune.training.lora import lora_finetune, lora_init, lora_merge
from jaxprune.training.masked import keep_masked, lm_loss, random_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def model():
    params = models.init(CFG, jax.random.key(0))
    calib = np.asarray(jax.random.randint(jax.random.key(1), (16, 24), 0, CFG.vocab_size), np.int32)
    masks = jp.wanda(params, calib[:4], sparsity=0.5)
    return params, calib, masks


def _pruned_entries(tree, masks):
    return np.concatenate([np.asarray(x)[~np.asarray(m)].ravel()
                           for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(masks))])


def _train(params, calib, tx, steps=8):
    state = tx.init(params)

    @jax.jit
    def step(p, state, batch):
        grads = jax.grad(lm_loss)(p, batch)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    for i in range(steps):
        params, state = step(params, state, random_batch(jax.random.key(i), calib, 4))
    return params


def test_masked_weights_stay_exactly_zero_under_adamw_with_weight_decay(model):
    params, calib, masks = model
    pruned = jp.apply_masks(params, masks)
    trained = _train(pruned, calib, optax.chain(optax.adamw(1e-2, weight_decay=0.1), keep_masked(masks)))
    assert np.all(_pruned_entries(trained, masks) == 0)
    kept_before = np.concatenate([np.asarray(x)[np.asarray(m)] for x, m in
                                  zip(jax.tree.leaves(pruned), jax.tree.leaves(masks))])
    kept_after = np.concatenate([np.asarray(x)[np.asarray(m)] for x, m in
                                 zip(jax.tree.leaves(trained), jax.tree.leaves(masks))])
    assert np.mean(kept_before != kept_after) > 0.9                     # the rest did train
    # without it, Adam revives the pruned weights (so the check above can fail)
    revived = _train(pruned, calib, optax.adamw(1e-2, weight_decay=0.1), steps=2)
    assert np.mean(_pruned_entries(revived, masks) != 0) > 0.5


def test_keep_masked_zeroes_unpruned_params_after_one_step_and_masks_updates_without_params(model):
    params, calib, masks = model
    trained = _train(params, calib, optax.chain(optax.adam(1e-3), keep_masked(masks)), steps=1)
    assert np.all(_pruned_entries(trained, masks) == 0)                 # dense start, pruned by the update
    tx = keep_masked(masks)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params))
    assert np.all(_pruned_entries(updates, masks) == 0)
    assert np.all(np.concatenate([np.asarray(u)[np.asarray(m)] for u, m in
                                  zip(jax.tree.leaves(updates), jax.tree.leaves(masks))]) == 1)


def test_keep_masked_rejects_masks_of_another_model(model):
    params, _, masks = model
    tx = keep_masked({"w": jnp.ones(3, bool)})
    with pytest.raises(InvalidArgumentError, match="structure"):
        tx.update(params, tx.init(params), params)


# ---- LoRA ----

def test_lora_merge_is_w_plus_scaled_low_rank_update_where_the_mask_keeps(model):
    params, calib, masks = model
    pruned = jp.apply_masks(params, masks)
    adapters = lora_init(pruned, jax.random.key(3), rank=4)
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(4), x.shape), adapters)
    merged = lora_merge(pruned, adapters, masks, alpha=8.0)
    for name, ab in adapters.items():
        node_m, node_p, node_k = merged.tree, pruned.tree, masks.tree
        for p in name.split("/"):
            p = int(p) if p.isdigit() else p
            node_m, node_p, node_k = node_m[p], node_p[p], node_k[p]
        a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
        want = np.asarray(node_p["kernel"]) + (8.0 / 4) * (a @ b) * np.asarray(node_k["kernel"])
        np.testing.assert_allclose(np.asarray(node_m["kernel"]), want, atol=1e-5)
    assert sorted(adapters) == sorted("/".join(map(str, k)) for k in _kernel_paths(params))


def _kernel_paths(params):
    from jaxprune.calibration.capture import plain_path
    return [plain_path(k)[:-1] for k, x in jax.tree_util.tree_flatten_with_path(params.tree)[0]
            if plain_path(k)[0] == "layers" and plain_path(k)[-1] == "kernel"]


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_lora_recovery_lowers_the_loss_and_keeps_sparsity_exactly(model, pattern):
    params, calib, _ = model
    masks = jp.wanda(params, calib[:4], sparsity=0.5, pattern=pattern)
    pruned = jp.apply_masks(params, masks)
    res = lora_finetune(pruned, calib, masks=masks, rank=4, steps=30, batch_size=4,
                        optimizer=optax.adam(1e-2), key=jax.random.key(0), show_progress=False)
    merged = lora_merge(pruned, res.adapters, masks)
    before, after = float(lm_loss(pruned, jnp.asarray(calib))), float(lm_loss(merged, jnp.asarray(calib)))
    assert after < before - 0.05
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert np.all(_pruned_entries(merged, masks) == 0)
    if pattern == "2:4":
        k = np.asarray(merged["layers"][0]["mlp"]["down_proj"]["kernel"])     # [in, out]: groups along in
        assert np.all((k.reshape(-1, 4, k.shape[1]) != 0).sum(axis=1) <= 2)


def test_lora_on_a_compacted_model_needs_no_mask(model):
    params, calib, _ = model
    small = jp.compact(params, {"ffn": jnp.ones((2, 64)).at[:, :32].set(0.0)})
    res = lora_finetune(small, calib, rank=2, steps=2, batch_size=2, key=jax.random.key(0), show_progress=False)
    merged = lora_merge(small, res.adapters)
    assert merged["layers"][0]["mlp"]["up_proj"]["kernel"].shape == (32, 32)


def test_lora_rejects_bad_input(model):
    params, calib, _ = model
    with pytest.raises(InvalidArgumentError, match="rank"):
        lora_init(params, jax.random.key(0), rank=0)
    with pytest.raises(InvalidArgumentError, match="rank"):
        lora_init(params, jax.random.key(0), rank=1000)
    with pytest.raises(InvalidArgumentError, match="calib"):
        lora_finetune(params, np.zeros(5, np.int32), key=jax.random.key(0))
    with pytest.raises(jp.InvalidArgumentError, match="key"):
        lora_finetune(params, np.zeros((2, 5), np.int32))     # no silent default seed


def test_example_masked_training_loop_runs_on_a_tiny_model(tmp_path):
    env = dict(os.environ, JAXPRUNE_PROGRESS="0")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "masked_training.py"), "--tiny",
                          "--steps", "3"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pruned weights still zero: True" in out.stdout
