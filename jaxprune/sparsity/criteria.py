"""Importance scores: pure functions of (weights, statistics) -> scores shaped like the weights.

Kernels are `[in, out]`; statistics are per input feature.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1., -2.], [3., 4.]])
    >>> magnitude(w).tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    >>> wanda(w, jnp.array([4., 1.])).tolist()        # |W| * sqrt(mean ||x_j||^2)
    [[2.0, 4.0], [3.0, 4.0]]
"""

from __future__ import annotations

import jax.numpy as jnp


def magnitude(kernel):
    """|W| (Han et al. 2015)."""
    return jnp.abs(kernel.astype(jnp.float32))


def wanda(kernel, sq_norm_mean):
    """Wanda (Sun et al. 2024): |W_ij| * ||X_i|| with ||X_i||^2 averaged over tokens.

    Args:
      kernel: `[in, out]`.
      sq_norm_mean: `[in]`, mean over calibration tokens of x_i^2 (float32).
    """
    return jnp.abs(kernel.astype(jnp.float32)) * jnp.sqrt(sq_norm_mean.astype(jnp.float32))[:, None]
