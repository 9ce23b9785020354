"""Keeping a mask through training that composes with optax (losses: `jaxprune.training.losses`).

`keep_masked(masks)` is an optax gradient transformation that holds a pruning
mask through any training: chained after the optimiser, it zeroes the update of
every pruned weight and, given the params, sets pruned weights to exactly zero
(``update = -w``), so Adam's moments and decoupled weight decay never revive
them. The losses are pure and jit-able.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> w = {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> masks = {"kernel": jnp.array([[True, False], [False, True]])}
    >>> w = jax.tree.map(lambda x, m: x * m, w, masks)                  # pruned
    >>> tx = optax.chain(optax.adamw(0.1, weight_decay=0.1), keep_masked(masks))
    >>> state = tx.init(w)
    >>> for _ in range(3):
    ...     grads = jax.grad(lambda p: jnp.sum((p["kernel"] - 5.0) ** 2))(w)
    ...     updates, state = tx.update(grads, state, w)
    ...     w = optax.apply_updates(w, updates)
    >>> w["kernel"].tolist()[0][1], w["kernel"].tolist()[1][0]
    (0.0, 0.0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxprune.errors import InvalidArgumentError
from jaxprune.sparsity.masks import mask_mismatch
from jaxprune.core.params import Params
from jaxprune.training.losses import distillation_loss, lm_loss, random_batch  # noqa: F401  (re-exported)

__all__ = ["keep_masked"]


def _as_tree(x):
    return x.tree if isinstance(x, Params) else x


def keep_masked(masks) -> optax.GradientTransformation:
    """Gradient transformation keeping pruned weights at exactly zero; chain it *last*.

    `masks` is a pytree of booleans (True = kept) shaped like the params, e.g. from
    `jaxprune.wanda`; a leaf may also be a plain True (never masked). Without params passed to
    ``update`` it only zeroes the updates of pruned entries."""
    masks = _as_tree(masks)
    for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
        if getattr(m, "dtype", None) != jnp.bool_ and not isinstance(m, bool):
            raise InvalidArgumentError(f"keep_masked: mask {jax.tree_util.keystr(path)} must be boolean "
                                       f"(True = keep), got {type(m).__name__} {getattr(m, 'dtype', '')}")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        tree_u = _as_tree(updates)
        err = mask_mismatch(tree_u, masks, scalar_ok=True)   # static: shapes and dtypes only
        if err:
            raise InvalidArgumentError(f"keep_masked: the masks do not have the structure of the updates ({err})")
        try:
            if params is None:
                new = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), tree_u, masks)
            else:
                new = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p).astype(u.dtype),
                                   tree_u, masks, _as_tree(params))
        except ValueError as e:
            raise InvalidArgumentError(f"keep_masked: the masks do not have the structure of the updates ({e})")
        if isinstance(updates, Params):
            new = Params(updates.config, new)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)
