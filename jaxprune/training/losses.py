"""The losses every package shares: next-token NLL (one definition), LM loss, distillation KL
(full, or against a teacher's top-k logits), hidden-state MSE.

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


def head_nll(params, hidden, tokens, gates=None, chunk: int = 128):
    """Per-prediction NLL [B, T-1] of tokens[:, 1:] from the last hidden states [B, T, D]
    (`models.hidden_states`), with the final norm, LM head and log-sum-exp applied to `chunk`
    positions at a time: the B x T x V logits never exist at once (on CPU, 128 positions of
    SmolLM2's 49k vocabulary stay in cache: 30% less time than the whole batch's logits).
    Traceable and differentiable."""
    B, T, D = hidden.shape
    h = hidden[:, :-1].reshape(-1, D)
    targets = tokens[:, 1:].reshape(-1)
    n = h.shape[0]
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, 1, chunk, D)
    t = jnp.pad(targets, (0, pad)).reshape(-1, chunk)

    def one(args):
        hc, tc = args
        logits = models.unembed(params, hc, gates)[0]
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]

    return jax.lax.map(one, (h, t)).reshape(-1)[:n].reshape(B, T - 1)


def mean_nll(params, windows, gates=None, chunk: int = 256):
    """Mean next-token NLL over `windows` [N, T], with the LM head applied to `chunk` positions
    at a time, so a sub-model never holds more than chunk x vocab logits (traceable)."""
    return jnp.mean(head_nll(params, models.hidden_states(params, windows, gates), windows, gates, chunk))


def lm_loss(params: Params, batch, gates=None):
    """Mean next-token negative log-likelihood of `batch` (int [B, T]) under optional gates."""
    return mean_nll(params, batch, gates)


def kl_divergence(teacher_logits, student_logits, temperature: float = 1.0):
    """Per-position ``T**2 * KL(p_t || p_s)`` [...] with ``p = softmax(logits / T)`` over the last
    axis (float32; the ``T**2`` keeps gradient sizes comparable across temperatures, as in Hinton
    et al. 2015)."""
    logp_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1) * temperature ** 2


_OUT = -1e30    # a logit that stands for "not in this bucket" (finite, so gradients stay finite)


def _log_rest(scaled_logits, top_indices):
    """log of the softmax mass of `scaled_logits` [..., V] outside `top_indices` [..., k]."""
    masked = jnp.put_along_axis(scaled_logits, top_indices, _OUT, axis=-1, inplace=False)
    return jax.nn.logsumexp(masked, axis=-1) - jax.nn.logsumexp(scaled_logits, axis=-1)


def top_k_targets(teacher_logits, k: int, temperature: float = 1.0):
    """The teacher's side of `top_k_kl`: (log-probabilities [..., k] of its k most likely tokens at
    `temperature`, under its full softmax; their indices [..., k] int32; the log of the probability
    of all other tokens [...]). Traceable."""
    z = teacher_logits.astype(jnp.float32) / temperature
    values, indices = jax.lax.top_k(z, k)
    return values - jax.nn.logsumexp(z, axis=-1)[..., None], indices.astype(jnp.int32), _log_rest(z, indices)


def top_k_kl(top_log_probs, top_indices, log_rest, student_logits, temperature: float = 1.0):
    """Per-position KL [...] between the teacher and the student coarsened to the teacher's top k
    tokens S plus one bucket R for every other token (`top_k_targets` gives the teacher's side):

        p_i = teacher's softmax(z_t / T)_i (i in S),  p_R = 1 - sum_S p_i = exp(log_rest)
        q_i = softmax(z_s / T)_i           (i in S),  q_R = 1 - sum_S q_i  (the student's full softmax)
        loss = T**2 * (sum_{i in S} p_i log(p_i / q_i) + p_R log(p_R / q_R))

    A KL over k + 1 categories: >= 0, zero when the student is the teacher, at most the full KL, and
    equal to it (`kl_divergence`) when k is the whole vocabulary. (Renormalising the teacher's top
    k instead would make the teacher itself a non-minimiser and push the student's tail to zero.)

    Example:
        >>> import jax, jax.numpy as jnp
        >>> t, s = jax.random.normal(jax.random.key(0), (2, 5, 7)), jax.random.normal(jax.random.key(1), (2, 5, 7))
        >>> bool(jnp.allclose(top_k_kl(*top_k_targets(t, 7, 2.0), s, 2.0), kl_divergence(t, s, 2.0), atol=1e-5))
        True
        >>> float(jnp.abs(top_k_kl(*top_k_targets(t, 3), t)).max()) < 1e-6     # the teacher itself: zero
        True
    """
    logp_t = top_log_probs.astype(jnp.float32)
    z = student_logits.astype(jnp.float32) / temperature
    logq = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), top_indices, axis=-1)
    log_rest = log_rest.astype(jnp.float32)
    rest = jnp.exp(log_rest) * (log_rest - _log_rest(z, top_indices))
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logq), axis=-1) + rest
    return kl * temperature ** 2


def hidden_mse(student_hidden, teacher_hidden):
    """Mean squared difference of two hidden-state arrays of one shape (float32 scalar)."""
    d = student_hidden.astype(jnp.float32) - teacher_hidden.astype(jnp.float32)
    return jnp.mean(jnp.square(d))


def distillation_loss(student: Params, teacher: Params, batch, gates=None, temperature: float = 1.0):
    """Mean per-token KL(teacher || student) of the next-token distributions at `temperature`
    (`kl_divergence`), the teacher being the (gate-free) `teacher` params held fixed."""
    t = jax.lax.stop_gradient(models.forward(teacher, batch))
    s = models.forward(student, batch, gates)
    return jnp.mean(kl_divergence(t, s, temperature))


def random_batch(key, windows, batch_size: int):
    """`batch_size` windows drawn uniformly (without replacement when there are enough)."""
    n = windows.shape[0]
    idx = jax.random.choice(key, n, (batch_size,), replace=batch_size > n)
    return windows[idx]


