"""`prune`: one entry point and one result type for every one-shot method.

`jaxprune.prune(params, calib, method=..., **settings)` runs magnitude, Wanda or SparseGPT and
returns a `PruneResult`: the pruned params (masks applied, and SparseGPT's weight updates) and
the masks together, whatever the method. The per-method functions (`jaxprune.wanda`,
`jaxprune.magnitude`, `jaxprune.sparsegpt`) stay as documented wrappers with their own
return conventions (masks; or params and masks for SparseGPT).

Example:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    >>> for method in jp.ONE_SHOT_METHODS:
    ...     r = jp.prune(params, calib, method=method, sparsity=0.5)
    ...     print(method, round(jp.sparsity_summary(r.masks)["pruned_sparsity"], 2))
    magnitude 0.5
    wanda 0.5
    sparsegpt 0.5
    >>> bool((jp.forward(r.params, calib[:1]) == jp.forward(jp.apply_masks(r.params, r.masks), calib[:1])).all())
    True
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jaxprune.errors import InvalidArgumentError
from jaxprune.oneshot.pruning import magnitude, sparsegpt, wanda
from jaxprune.sparsity.masks import apply_masks

ONE_SHOT_METHODS = ("magnitude", "wanda", "sparsegpt")


class PruneResult(NamedTuple):
    """What every one-shot method returns through `prune`.

    params: the pruned model: masks applied (pruned weights exactly 0), with SparseGPT's
      reconstruction updates on the kept weights.
    masks: the mask pytree (True = keep), shaped like `params`.
    method: the method's name.
    settings: the settings it ran with (as given).
    """

    params: Any
    masks: Any
    method: str
    settings: dict


def prune(params, calib=None, *, method: str = "wanda", **settings) -> PruneResult:
    """Prune `params` with one-shot `method`: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.

    Args:
      params: model `Params` (or your own Flax params with ``apply_fn=``, see `jaxprune.wanda`).
      calib: calibration tokens int [n, seqlen] (`jaxprune.calibration_windows`) or
        precomputed statistics; not used by magnitude (which accepts and ignores it, so one
        loop can run every method on the same data).
      method: one of `ONE_SHOT_METHODS`.
      **settings: the method's own settings (``sparsity``, ``pattern``, ``scope``, ``mode``,
        ``per_layer_sparsity``, ``prunable``, ``batch_size``, ``mesh``, ...), as documented on
        `jaxprune.magnitude`, `jaxprune.wanda` and `jaxprune.sparsegpt`.

    Returns:
      a `PruneResult` (params, masks, method, settings).

    Raises:
      InvalidArgumentError: an unknown method, missing calibration data for Wanda or SparseGPT,
        or any invalid setting (raised by the method).
    """
    if method not in ONE_SHOT_METHODS:
        raise InvalidArgumentError(f"unknown one-shot method {method!r}; choose one of {list(ONE_SHOT_METHODS)} "
                                   "(structured methods: jaxprune.bonsai, jaxprune.finercut, jaxprune.l0_prune)")
    if method == "magnitude":
        masks = magnitude(params, **settings)
        return PruneResult(apply_masks(params, masks), masks, method, dict(settings))
    if calib is None:
        raise InvalidArgumentError(f"{method} needs calibration data: prune(params, calib, method={method!r}, ...)")
    if method == "wanda":
        masks = wanda(params, calib, **settings)
        return PruneResult(apply_masks(params, masks), masks, method, dict(settings))
    new, masks = sparsegpt(params, calib, **settings)
    return PruneResult(apply_masks(new, masks), masks, method, dict(settings))
