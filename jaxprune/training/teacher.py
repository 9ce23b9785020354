"""What a distilled student learns from: logits and hidden states of a fixed model.

`outputs(params, tokens, layers)` is the forward that also returns the residual stream after
chosen decoder layers (traceable, used for student and teacher alike). The teacher's side runs
in its own compiled functions (`teacher_targets`), outside any gradient, so no teacher
activation is ever kept for backprop. `teacher_top_k` caches, once, what `losses.top_k_kl` needs
of the teacher at one temperature (`TopK`: the log-probabilities of its k most likely tokens, in
float16 by default, their int32 ids, and the float32 log-probability of all other tokens), which
bounds the memory of distilling from a large vocabulary to N x T x (6k + 4) bytes. (float16
log-probabilities put about 1e-3 relative error into the loss; pass ``dtype=np.float32`` for 8k + 4
bytes and float32 accuracy.)

Example:
    >>> import jax, numpy as np, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> teacher = jp.init(cfg, jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (3, 8), 0, 64)
    >>> cache = teacher_top_k(teacher, calib, k=5, temperature=2.0, batch_size=2, show_progress=False)
    >>> cache.log_probs.shape, cache.log_probs.dtype, cache.indices.dtype, cache.log_rest.shape
    ((3, 8, 5), dtype('float16'), dtype('int32'), (3, 8))
    >>> p = np.exp(cache.log_probs.astype(np.float64)).sum(-1) + np.exp(cache.log_rest)
    >>> bool(np.allclose(p, 1.0, atol=1e-3))
    True
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import models
from jaxprune.core.params import Params
from jaxprune.core.progress import progress
from jaxprune.training.losses import top_k_targets

__all__ = ["TopK", "depth", "outputs", "teacher_targets", "teacher_top_k"]


class TopK(NamedTuple):
    """The teacher's side of `losses.top_k_kl` for every position of the calibration windows:
    `log_probs` [N, T, k] (float16 or float32) of its k most likely tokens at `temperature` (best first),
    `indices` int32 [N, T, k] (their vocabulary ids), `log_rest` float32 [N, T] (the log of the
    probability of every other token)."""
    log_probs: np.ndarray
    indices: np.ndarray
    log_rest: np.ndarray
    temperature: float


def depth(params: Params) -> int:
    """Number of decoder layers, whether ``tree["layers"]`` is a list or one stacked dict of [L, ...] arrays."""
    layers = params.tree["layers"]
    return len(layers) if isinstance(layers, (list, tuple)) else int(np.shape(jax.tree.leaves(layers)[0])[0])


def outputs(params: Params, tokens, layers: tuple = ()):
    """(float32 logits [B, T, V], tuple of the residual streams [B, T, D] after each decoder layer
    in `layers`, non-negative ints). Traceable: the computation of `jaxprune.models.logits` (which
    it is, when no layer is asked for)."""
    if not layers:
        return models.logits(params, tokens), ()
    want = set(layers)
    x, ctx = models.embed(params, tokens)
    kept = {}
    for i in range(depth(params)):
        x = models.layer(params, i, x, ctx)
        if i in want:
            kept[i] = x
    return models.unembed(params, x), tuple(kept[i] for i in layers)


@partial(jax.jit, static_argnames=("layers", "with_logits"))
def _targets(teacher, tokens, layers, with_logits):
    logits, hidden = outputs(teacher, tokens, layers)
    return {"logits": logits, "hidden": hidden} if with_logits else {"hidden": hidden}


def teacher_targets(teacher: Params, tokens, layers: tuple = (), with_logits: bool = True) -> dict:
    """{"logits": [B, T, V] (when `with_logits`), "hidden": (states after `layers`,)} of the teacher,
    from a compiled function of its own (no gradient, no activations kept)."""
    return _targets(teacher, jnp.asarray(tokens, jnp.int32), tuple(layers), bool(with_logits))


@partial(jax.jit, static_argnames=("k", "temperature"))
def _top_k(teacher, tokens, k, temperature):
    return top_k_targets(models.logits(teacher, tokens), k, temperature)


def teacher_top_k(teacher: Params, windows, k: int, temperature: float = 1.0, batch_size: int = 4,
                  dtype=np.float16, show_progress: bool | None = None) -> TopK:
    """`TopK` of the teacher at `temperature` for every position of `windows` (int [N, T]) in host
    memory (log-probabilities in `dtype`), computed `batch_size` windows at a time (one
    compilation: the last batch is padded)."""
    windows = np.asarray(windows, np.int32)
    n, T = windows.shape
    log_probs = np.empty((n, T, k), dtype)
    indices = np.empty((n, T, k), np.int32)
    log_rest = np.empty((n, T), np.float32)
    starts = range(0, n, batch_size)
    for s in progress(starts, "teacher top-k", total=len(starts), enabled=show_progress):
        batch = windows[s:s + batch_size]
        m = len(batch)
        if m < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - m, T), np.int32)])
        lp, i, r = _top_k(teacher, jnp.asarray(batch), int(k), float(temperature))
        log_probs[s:s + m], indices[s:s + m] = np.asarray(lp)[:m], np.asarray(i)[:m]
        log_rest[s:s + m] = np.asarray(r)[:m]
    return TopK(log_probs, indices, log_rest, float(temperature))
