"""Pruning a user's own Flax model: a linen `params` dict or an `nnx.State`.

The inputs of every dense layer are captured during one calibration pass of the
unpruned model (dense one-pass statistics): with `flax.linen.intercept_methods`
on `nn.Dense`/`nn.DenseGeneral` for linen, and by wrapping `nnx.Linear.__call__`
for NNX (a Linear is matched to its state entry by the identity of its kernel,
which holds inside `jit` too). `jaxprune.wanda/magnitude/sparsegpt` dispatch here
when `params` is not jaxprune `Params`.

Kernels are `[in, out]` (Flax's layout); a DenseGeneral kernel `[in, *features]`
is treated as `[in, prod(features)]`.

Example (linen):
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxprune as jp
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> masks = jp.wanda(params, x, sparsity=0.5, apply_fn=lambda p, b: model.apply({"params": p}, b))
    >>> float(masks["layers_0"]["kernel"].mean())
    0.5
"""

from __future__ import annotations

import contextlib
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import criteria
from .calibration import _dense_interceptor, input_stat, plain_path
from .errors import InvalidArgumentError
from .masks import _is_real_dtype, group_size, n_pruned, select_count
from .sparsegpt import block_counts, solve


def _strip(path: tuple) -> tuple:
    return path[:-1] if path and path[-1] == "value" else path


def user_default_prunable(path: tuple) -> bool:
    """Every leaf named `kernel` (2-D or DenseGeneral)."""
    return bool(path) and path[-1] == "kernel"


@contextlib.contextmanager
def _capture_nnx(on_linear):
    from flax import nnx
    original = nnx.Linear.__call__

    def patched(self, x, *args, **kwargs):
        kernel = self.kernel.get_value() if hasattr(self.kernel, "get_value") else self.kernel.value
        on_linear(kernel, x)
        return original(self, x, *args, **kwargs)

    nnx.Linear.__call__ = patched
    try:
        yield
    finally:
        nnx.Linear.__call__ = original


def collect(params, batch, apply_fn: Callable, kind: str) -> dict:
    """{plain kernel path: summed input statistic} over one batch (pure; jit-able)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    by_id = {id(leaf): _strip(plain_path(kp)) for kp, leaf in leaves}
    stats: dict = {}
    cache: dict = {}

    def record(path, x):
        if id(x) not in cache:
            cache[id(x)] = (x, input_stat(kind, x))
        stats[path] = cache[id(x)][1]

    def on_dense(mpath, module, x, call):
        record(tuple(mpath) + ("kernel",), x)
        return call()

    def on_linear(kernel, x):
        path = by_id.get(id(kernel))
        if path is not None:
            record(path, x)

    with nn.intercept_methods(_dense_interceptor(on_dense)), _capture_nnx(on_linear):
        apply_fn(params, batch)
    return stats


def _batches(calib):
    if isinstance(calib, (list, tuple)):
        return list(calib)
    return [calib]


def prune_user_model(params, calib, method: str, sparsity: float, nm, scope: str, apply_fn, prunable,
                     blocksize: int = 128, percdamp: float = 0.01):
    """Masks (and for SparseGPT new params) for a user's params pytree. See module docstring."""
    prunable = prunable or user_default_prunable
    kernels = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _strip(plain_path(kp))
        if prunable(path) and np.ndim(leaf) >= 2:
            if not _is_real_dtype(getattr(leaf, "dtype", None)):
                raise InvalidArgumentError(f"{path} must be an array of real numbers, got {type(leaf).__name__} "
                                           f"{getattr(leaf, 'dtype', '')}")
            if not bool(jnp.isfinite(leaf).all()):
                raise InvalidArgumentError(f"{path} holds NaN or Inf weights")
            kernels[path] = leaf
    if not kernels:
        raise InvalidArgumentError("the prunable predicate selects no kernel of at least 2 dimensions")
    stats, count = {}, 0.0
    if method != "magnitude":
        if apply_fn is None:
            raise InvalidArgumentError(f"{method} on your own Flax model needs apply_fn(params, batch) "
                                       "to run calibration")
        kind = "sumsq" if method == "wanda" else "hessian"
        run = jax.jit(lambda p, b: collect(p, b, apply_fn, kind))
        for b in _batches(calib):
            st = run(params, b)
            stats = st if not stats else jax.tree.map(jnp.add, stats, st)
            leading = np.shape(b)[:-1]
            count += float(np.prod(leading)) if leading else 1.0
        missing = [p for p in kernels if p not in stats]
        if missing:
            raise InvalidArgumentError(f"no calibration input reached {missing[:3]}: they are not nn.Dense/"
                                       "nn.DenseGeneral/nnx.Linear layers called by apply_fn; exclude them "
                                       "with `prunable`")
    new_kernels, keeps = {}, {}
    for path, k in kernels.items():
        k2 = k.reshape(k.shape[0], int(np.prod(k.shape[1:])))   # [in, out...] -> [in, out]; sizes may be 0
        if method == "sparsegpt":
            kf, kl = block_counts(k2.shape[1], k2.shape[0], sparsity, blocksize)
            new, keep = solve(k2, 2.0 * stats[path] / count, kf, kl, nm=nm, blocksize=blocksize, percdamp=percdamp)
        else:
            scores = criteria.magnitude(k2) if method == "magnitude" else criteria.wanda(k2, stats[path] / count)
            keep = select_count(scores, n_pruned(group_size(k2.shape, scope), sparsity), nm, scope)
            new = jnp.where(keep, k2, 0)
        keeps[path] = keep.reshape(k.shape)
        new_kernels[path] = new.reshape(k.shape).astype(k.dtype)

    def mask_leaf(kp, leaf):
        return keeps.get(_strip(plain_path(kp)), jnp.ones(jnp.shape(leaf), bool))

    def param_leaf(kp, leaf):
        return new_kernels.get(_strip(plain_path(kp)), leaf)

    masks = jax.tree_util.tree_map_with_path(mask_leaf, params)
    if method == "sparsegpt":
        return jax.tree_util.tree_map_with_path(param_leaf, params), masks
    return masks
