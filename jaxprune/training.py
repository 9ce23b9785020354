"""Training pieces that compose with optax: losses, batches, and keeping a mask.

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

from . import models
from .errors import InvalidArgumentError
from .masks import mask_mismatch
from .params import Params
from .utility import mean_nll

__all__ = ["distillation_loss", "keep_masked", "lm_loss", "random_batch"]


def lm_loss(params: Params, batch, gates=None):
    """Mean next-token negative log-likelihood of `batch` (int [B, T]) under optional gates."""
    return mean_nll(params, batch, gates)


def distillation_loss(student: Params, teacher: Params, batch, gates=None, temperature: float = 1.0):
    """Mean per-token KL(teacher || student) of the next-token distributions at `temperature`,
    the teacher being the (gate-free) `teacher` params held fixed."""
    t = jax.lax.stop_gradient(models.forward(teacher, batch)) / temperature
    s = models.forward(student, batch, gates) / temperature
    logp_t = jax.nn.log_softmax(t, axis=-1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - jax.nn.log_softmax(s, axis=-1)), axis=-1)
    return jnp.mean(kl) * temperature ** 2


def random_batch(key, windows, batch_size: int):
    """`batch_size` windows drawn uniformly (without replacement when there are enough)."""
    n = windows.shape[0]
    idx = jax.random.choice(key, n, (batch_size,), replace=batch_size > n)
    return windows[idx]


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
