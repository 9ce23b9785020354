"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Layers with more outliers keep more weights. A layer's outlier ratio D_l is the share
of its Wanda scores |W| * ||X|| (over all of its linear layers) above `m` times their
mean; ratios are rescaled to [0, 2 * lam], shifted to mean (1 - sparsity), and used as
per-layer keep ratios, so the average sparsity over layers stays `sparsity`.

Example:
    >>> per_layer = jp.owl_sparsities(params, calib, sparsity=0.5)             # doctest: +SKIP
    >>> masks = jp.wanda(params, calib, 0.5, per_layer_sparsity=per_layer)      # doctest: +SKIP
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.sparsity import criteria
from jaxprune.calibration.capture import input_stats, path_key, plain_path
from jaxprune.calibration.driver import default_batch_size
from jaxprune.errors import InvalidArgumentError
from jaxprune.sparsity.masks import check_sparsity
from jaxprune.core.params import Params
from jaxprune.oneshot.pruning import _validate_tokens, default_prunable


def outlier_ratios(params: Params, stats: dict, m: float = 5.0, prunable=default_prunable) -> np.ndarray:
    """Per layer: fraction of Wanda scores above m x the layer's mean score."""
    sums, count = stats["sums"], stats["count"]
    ratios = []
    for i, lp in enumerate(params.tree["layers"]):
        scores = []
        for kp, k in jax.tree_util.tree_flatten_with_path(lp)[0]:
            path = ("layers", i) + plain_path(kp)
            if np.ndim(k) == 2 and prunable(path) and path_key(path) in sums:
                scores.append(criteria.wanda(k, sums[path_key(path)] / count).ravel())
        s = jnp.concatenate(scores)
        ratios.append(float(jnp.mean(s > m * jnp.mean(s))))
    return np.asarray(ratios)


def allocate(ratios, sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL's rule: keep ratios rescaled to [0, 2*lam] and centred on 1 - sparsity."""
    r = np.asarray(ratios, np.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * lam * 2 if spread > 0 else np.zeros_like(r)
    keep = scaled - scaled.mean() + (1 - sparsity)
    return [float(np.clip(1 - k, 0.0, 0.999)) for k in keep]


_input_stats_jit = jax.jit(input_stats, static_argnames="kind")


def owl_sparsities(params: Params, calib, sparsity: float = 0.5, m: float = 5.0, lam: float = 0.08,
                   batch_size: int | None = None) -> list[float]:
    """Per-layer sparsities from OWL, with statistics of the dense model on `calib` (`batch_size`
    windows per forward; default `calibration.driver.default_batch_size`)."""
    sparsity = check_sparsity(sparsity)
    if lam < 0 or m <= 0:
        raise InvalidArgumentError(f"OWL needs lam >= 0 and m > 0, got lam={lam}, m={m}")
    tokens = _validate_tokens(params, calib)
    batch_size = default_batch_size(tokens.shape[1], batch_size)
    total = None
    for s in range(0, tokens.shape[0], batch_size):
        st = _input_stats_jit(params, tokens[s:s + batch_size], "sumsq")
        total = st if total is None else jax.tree.map(jnp.add, total, st)
    return allocate(outlier_ratios(params, total, m), sparsity, lam)
