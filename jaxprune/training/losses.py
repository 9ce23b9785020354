"""The losses every package shares: next-token NLL (one definition), LM loss, distillation KL.

All pure and jit-able; `mean_nll` applies the LM head a chunk of positions at a time so a
batch of sub-models never holds all the logits at once.

Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.zeros((1, 3, 4))                  # uniform over 4 tokens
    >>> round(float(token_nll(logits, jnp.array([[0, 1, 2]])).mean()), 4)   # log 4
    1.3863
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprune import models
from jaxprune.core.params import Params


def token_nll(logits, tokens):
    """Per-prediction NLL [B, T-1] of tokens[:, 1:] under logits[:, :-1] (float32)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def mean_nll(params, windows, gates=None, chunk: int = 256):
    """Mean next-token NLL over `windows` [N, T], with the LM head applied to `chunk` positions
    at a time, so a sub-model never holds more than chunk x vocab logits (traceable)."""
    h = models.hidden_states(params, windows, gates)[:, :-1]
    D = h.shape[-1]
    h = h.reshape(-1, D)
    targets = windows[:, 1:].reshape(-1)
    n = h.shape[0]
    pad = (-n) % chunk
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, 1, chunk, D)
    t = jnp.pad(targets, (0, pad)).reshape(-1, chunk)

    def one(args):
        hc, tc = args
        logits = models.unembed(params, hc, gates)[0]
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]

    nll = jax.lax.map(one, (h, t)).reshape(-1)[:n]
    return jnp.mean(nll)


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


