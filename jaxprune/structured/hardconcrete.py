"""HardConcrete gates (Louizos, Welling & Kingma 2018, "Learning Sparse Neural
Networks through L0 Regularization"), as pure functions of ``log_alpha``.

A gate draws u ~ U(0, 1), computes
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, stretches it to
``(gamma, zeta) = (-0.1, 1.1)`` and clips to [0, 1]: the gate is exactly 0 or
exactly 1 with positive probability and differentiable in ``log_alpha`` in
between. `prob_nonzero` is the expected L0 norm of a gate,
``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``, and
`deterministic` the test-time gate ``clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> la = jnp.array([-6.0, 0.0, 6.0])
    >>> z = sample(jax.random.key(0), la)
    >>> z.shape, bool(((z >= 0) & (z <= 1)).all())
    ((3,), True)
    >>> [round(float(p), 3) for p in prob_nonzero(la)]
    [0.012, 0.832, 0.999]
    >>> deterministic(la).tolist()
    [0.0, 0.5, 1.0]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BETA = 2.0 / 3.0
GAMMA, ZETA = -0.1, 1.1
_EPS = 1e-6

__all__ = ["BETA", "GAMMA", "ZETA", "deterministic", "prob_nonzero", "sample"]


def sample(key, log_alpha, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA):
    """One HardConcrete draw per entry of `log_alpha` (same shape, float32, in [0, 1]).

    Differentiable in `log_alpha` (the reparameterisation trick); `key` is a `jax.random` key."""
    log_alpha = jnp.asarray(log_alpha, jnp.float32)
    u = jax.random.uniform(key, log_alpha.shape, jnp.float32, _EPS, 1.0 - _EPS)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
    return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def prob_nonzero(log_alpha, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA):
    """Expected L0 norm of each gate: P(z != 0) in closed form (differentiable)."""
    return jax.nn.sigmoid(jnp.asarray(log_alpha, jnp.float32) - beta * math.log(-gamma / zeta))


def deterministic(log_alpha, gamma: float = GAMMA, zeta: float = ZETA):
    """The test-time gate of Louizos et al.: the stretched sigmoid without noise, clipped."""
    return jnp.clip(jax.nn.sigmoid(jnp.asarray(log_alpha, jnp.float32)) * (zeta - gamma) + gamma, 0.0, 1.0)
