"""jp.wanda / magnitude / sparsegpt on a user's own Flax model (linen and NNX), against numpy."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from sparsegpt_reference import sparsegpt_numpy

X = np.random.default_rng(0).normal(size=(2, 40, 16)).astype(np.float32)  # two batches of inputs


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="up")(x))
        return nn.Dense(8, name="down")(h)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def linen_setup():
    model = LinenMLP()
    params = model.init(jax.random.key(0), X[0])["params"]
    return params, (lambda p, b: model.apply({"params": p}, b)), lambda t, name: np.asarray(t[name]["kernel"]), \
        lambda t, name: np.asarray(t[name]["bias"])


def nnx_setup():
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param)
    get = lambda t, name, leaf: np.asarray(jax.tree.leaves(t[name][leaf])[0])
    return state, (lambda s, b: nnx.merge(graphdef, s)(b)), lambda t, n: get(t, n, "kernel"), lambda t, n: get(t, n, "bias")


def np_inputs(up_k, up_b):
    x = X.reshape(-1, 16).astype(np.float64)
    return {"up": x, "down": np.maximum(x @ up_k + up_b, 0)}


def np_wanda(k, x, sparsity=0.5):
    metric = np.abs(k) * np.sqrt((x ** 2).mean(0))[:, None]  # [in, out]
    keep = np.zeros_like(k, bool)
    order = np.argsort(-metric, axis=0, kind="stable")
    n = k.shape[0] - int(k.shape[0] * sparsity)
    for j in range(k.shape[1]):
        keep[order[:n, j], j] = True
    return keep


@pytest.mark.parametrize("setup", [linen_setup, nnx_setup], ids=["linen", "nnx"])
def test_wanda_on_user_model_matches_numpy(setup):
    params, apply_fn, kernel, bias = setup()
    masks = jp.wanda(params, [X[0], X[1]], sparsity=0.5, apply_fn=apply_fn)
    assert type(masks) is type(params)
    inputs = np_inputs(kernel(params, "up"), bias(params, "up"))
    for name in ("up", "down"):
        np.testing.assert_array_equal(kernel(masks, name), np_wanda(kernel(params, name), inputs[name]))
    assert bias(masks, "up").all()


@pytest.mark.parametrize("setup", [linen_setup, nnx_setup], ids=["linen", "nnx"])
def test_sparsegpt_on_user_model_matches_numpy(setup):
    params, apply_fn, kernel, bias = setup()
    new, masks = jp.sparsegpt(params, [X[0], X[1]], sparsity=0.5, apply_fn=apply_fn, blocksize=8)
    inputs = np_inputs(kernel(params, "up"), bias(params, "up"))
    for name in ("up", "down"):
        x = inputs[name]
        W_ref, keep_ref = sparsegpt_numpy(kernel(params, name).T, 2.0 / len(x) * x.T @ x, 0.5, blocksize=8)
        np.testing.assert_array_equal(kernel(masks, name), keep_ref.T)
        np.testing.assert_allclose(kernel(new, name), W_ref.T, atol=1e-4)


def test_magnitude_and_predicate_on_user_model():
    params, apply_fn, kernel, _ = linen_setup()
    masks = jp.magnitude(params, sparsity=0.25, prunable=lambda path: path == ("down", "kernel"))
    assert kernel(masks, "up").all()
    k = np.abs(kernel(params, "down")).ravel()
    ref = np.zeros(k.size, bool)
    ref[np.argsort(-k, kind="stable")[: k.size - int(k.size * 0.25)]] = True
    np.testing.assert_array_equal(kernel(masks, "down").ravel(), ref)
    pruned = jp.apply_masks(params, masks)
    assert (np.asarray(pruned["down"]["kernel"]) == 0).mean() == 0.25


class JittedNNXMLP(nnx.Module):
    """Layers called under an inner jax.jit (their kernels reach the matmul inside a sub-jaxpr)."""

    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        up = jax.jit(lambda k, b, x: x @ k + b)   # the same matmul nnx.Linear does, behind a jit
        return self.down(jax.nn.relu(up(self.up.kernel[...], self.up.bias[...], x)))


def test_nnx_capture_patches_no_class_and_follows_inner_jits():
    """NNX inputs are found in the traced computation: nnx.Linear.__call__ is never replaced (other
    models and threads see the class unchanged), and kernels used under an inner jit are found."""
    original = nnx.Linear.__call__
    seen = []
    graphdef, state = nnx.split(JittedNNXMLP(nnx.Rngs(0)), nnx.Param)

    def apply_fn(s, b):
        seen.append(nnx.Linear.__call__ is original)
        return nnx.merge(graphdef, s)(b)

    masks = jp.wanda(state, [X[0], X[1]], sparsity=0.5, apply_fn=apply_fn)
    assert seen and all(seen) and nnx.Linear.__call__ is original
    get = lambda t, name: np.asarray(jax.tree.leaves(t[name]["kernel"])[0])
    bias = np.asarray(jax.tree.leaves(state["up"]["bias"])[0])
    inputs = np_inputs(get(state, "up"), bias)
    for name in ("up", "down"):
        np.testing.assert_array_equal(get(masks, name), np_wanda(get(state, name), inputs[name]))


def test_second_call_on_a_user_model_compiles_nothing():
    from test_compile_once import count_compiles
    for params, apply_fn, _, _ in (linen_setup(), nnx_setup()):
        jp.wanda(params, [X[0], X[1]], sparsity=0.5, apply_fn=apply_fn)
        jp.magnitude(params, sparsity=0.5)
        with count_compiles() as names:
            jax.block_until_ready(jp.wanda(params, [X[0], X[1]], sparsity=0.3, apply_fn=apply_fn))
            jax.block_until_ready(jp.magnitude(params, sparsity=0.25))
        assert names == [], names
