"""Perplexity with a pinned protocol.

perplexity = exp(mean NLL) over every next-token prediction inside each window
(`seqlen - 1` per window: no prediction crosses a window boundary, no BOS is
added). NLL sums run in float32 on device per batch and float64 on the host.

Example:
    >>> import jaxprune as jp
    >>> params, tok = jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m")   # doctest: +SKIP
    >>> ev = jp.eval_windows(tok, jp.bundled_text("prideprejudice"), 512, max_windows=64)  # doctest: +SKIP
    >>> round(jp.perplexity(params, ev, seqlen=512), 1)                        # doctest: +SKIP
    26.8
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import InvalidArgumentError
from jaxprune.models import hidden_states
from jaxprune.models import logits as model_logits  # noqa: F401  (re-exported by jaxprune.evaluation)
from jaxprune.core.params import Params
from jaxprune.core.progress import progress
from jaxprune.training.losses import head_nll, token_nll  # noqa: F401  (token_nll: re-exported)


@jax.jit
def _batch_nll(params, tokens, weight, gates):
    nll = head_nll(params, hidden_states(params, tokens, gates), tokens, gates)   # no [B, T, V] logits
    return jnp.sum(nll.sum(axis=1) * weight)


def nll_sum(params: Params, windows, batch_size: int = 4, gates=None, show_progress=None) -> tuple[float, int]:
    """(total NLL, number of predictions) over all windows, batched and jit-compiled."""
    windows = np.asarray(windows)
    n, T = windows.shape
    total = 0.0
    starts = range(0, n, batch_size)
    for s in progress(starts, "perplexity", total=len(starts), enabled=show_progress if show_progress is not None
                      else (None if len(starts) > 4 else False)):
        batch = windows[s:s + batch_size]
        k = len(batch)
        weight = np.zeros(batch_size, np.float32)
        weight[:k] = 1.0
        if k < batch_size:  # pad so every batch has one shape (one compilation)
            batch = np.concatenate([batch, np.zeros((batch_size - k, T), batch.dtype)])
        total += float(_batch_nll(params, jnp.asarray(batch, jnp.int32), jnp.asarray(weight), gates))
    return total, n * (T - 1)


def perplexity(params: Params, windows, seqlen: int | None = None, batch_size: int = 4, gates=None,
               show_progress: bool | None = None) -> float:
    """Perplexity of `params` (optionally gated) over token windows int [n, seqlen].

    Args:
      params: model params from `jaxprune.load` (pruned or not).
      windows: int array [n, seqlen], e.g. from `jaxprune.eval_windows`.
      seqlen: if given, must equal `windows.shape[1]` (a guard against mixing protocols).
      batch_size: windows per compiled forward.
      gates: optional structured gates (see `jaxprune.models.gates`).
      show_progress: progress bar; None shows it on a terminal for long runs.

    Returns:
      exp(mean NLL) over the `seqlen - 1` predictions of every window.
    """
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"perplexity needs jaxprune Params, got {type(params).__name__}")
    try:
        windows = np.asarray(windows)
    except (ValueError, TypeError) as e:   # e.g. ragged nested lists
        raise InvalidArgumentError(f"windows must be an int array [n, seqlen], got {type(windows).__name__} "
                                   f"({str(e).splitlines()[0][:120]})") from None
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise InvalidArgumentError(f"windows must be an int array [n >= 1, seqlen >= 2], got shape {windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise InvalidArgumentError(f"windows must hold integer token ids, got {windows.dtype}")
    if seqlen is not None and windows.shape[1] != seqlen:
        raise InvalidArgumentError(f"windows have length {windows.shape[1]} but seqlen={seqlen}")
    context = getattr(params.config, "max_position_embeddings", None)
    if context is not None and windows.shape[1] > context:
        raise InvalidArgumentError(f"windows of {windows.shape[1]} tokens exceed the model's context "
                                   f"(max_position_embeddings={context})")
    vocab = params.config.vocab_size
    if windows.min() < 0 or windows.max() >= vocab:
        raise InvalidArgumentError(f"token ids must lie in [0, {vocab}); got [{windows.min()}, {windows.max()}]")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    total, count = nll_sum(params, windows, min(batch_size, len(windows)), gates, show_progress)
    return math.exp(total / count)
