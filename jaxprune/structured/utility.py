"""Utilities of sub-models for structured pruning: higher is better.

A utility is either a jax-traceable ``utility(params, gates) -> scalar`` (Bonsai
and FinerCut `vmap` it over a batch of gates), or an object with
``evaluate_batch(params, stacked_gates, batch_size=None) -> np.ndarray [S]``
when it needs host-side work such as decoding text
(`jaxprune.evaluation.reasoning.ReasoningUtility`). `evaluate` runs either kind over a
batch of sub-models.

Example:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> u = perplexity_utility(jnp.ones((2, 8), jnp.int32))
    >>> g = {"ffn": jnp.ones((3, 2, 64)).at[1, 0, :32].set(0.0)}     # three sub-models
    >>> scores = evaluate(u, params, g, batch_size=2)
    >>> scores.shape, bool(scores[0] == scores[2]), bool(scores[0] != scores[1])
    ((3,), True, True)
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import InvalidArgumentError
from jaxprune.training.losses import mean_nll


def perplexity_utility(windows, chunk: int = 256, log: bool = False) -> Callable:
    """Negative perplexity on `windows` (int [N, T]): exp of the mean NLL of the next-token
    predictions (the protocol of `jaxprune.perplexity`), LM head in chunks of `chunk` tokens.
    With `log=True`, negative log-perplexity (= minus the mean NLL): the same ranking of
    sub-models on a scale that grows linearly, not exponentially, with the damage."""
    windows = jnp.asarray(windows, jnp.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise InvalidArgumentError(f"utility windows must be int [n, seqlen >= 2], got shape {windows.shape}")

    def utility(params, gates):
        nll = mean_nll(params, windows, gates, chunk)
        return -nll if log else -jnp.exp(nll)

    return utility


def _stack_size(stacked_gates) -> int:
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(stacked_gates)}
    if len(sizes) != 1:
        raise InvalidArgumentError(f"stacked gates need one leading sub-model axis, got sizes {sorted(sizes)}")
    return sizes.pop()


def evaluate(utility, params, stacked_gates, batch_size: int | None = 8) -> np.ndarray:
    """Scores [S] of S sub-models (gates with a leading axis S): a traceable utility runs as
    one jitted `lax.map` over the batch, `batch_size` sub-models per vmapped forward.

    The program is compiled once per utility (the same function object), batch size and shapes:
    keep one utility for all calls (as `jaxprune.structured.bonsai` does) rather than building a new one."""
    _stack_size(stacked_gates)
    if hasattr(utility, "evaluate_batch"):
        return np.asarray(utility.evaluate_batch(params, stacked_gates, batch_size=batch_size))
    return np.asarray(_mapped(params, stacked_gates, utility=utility, batch_size=batch_size))


@partial(jax.jit, static_argnames=("utility", "batch_size"))
def _mapped(params, stacked_gates, utility, batch_size):
    return jax.lax.map(lambda g: utility(params, g), stacked_gates, batch_size=batch_size)
