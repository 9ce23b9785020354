"""Bonsai (Dery et al. 2024, "Everybody Prune Now"): structured pruning from forward passes only.

Each round removes about `step` of the dense model's non-embedding parameters:

1. **prior**: activation x weight norms per unit (`jaxprune.structured.units.prior`) under
   the current gates. In every module (one unit kind of one layer) the
   highest-prior units are fixed; the lowest ``2 * step`` fraction are candidates.
2. **sampling**: `n_samples` sub-models in antithetic pairs. A sample drops
   half of each module's candidates (about ``step`` of its units), drawn without
   replacement with probability proportional to ``max(prior) - prior`` (Gumbel
   top-k, from an explicit `jax.random` key); its partner drops the complementary
   candidates. A module with one candidate drops it in a random half of the pairs
   (always dropping it would make its column constant within each pair's role).
3. **utility** of every sample, all evaluated by one jitted `lax.map` over a
   vmapped forward (`submodels_per_batch` sub-models at a time; `jaxprune.structured.utility`).
   Default: negative perplexity on the calibration windows, taken in log space
   (minus the mean NLL): the same ranking of sub-models, but a scale on which a
   linear model fits (perplexity grows exponentially as units go, so a few
   collapsed samples would dominate a fit of perplexity itself).
4. **importance**: ridge regression of utility on the candidates' keep-masks,
   closed form (dual when samples < units), shrunk towards a prior guess rather
   than towards zero: each unit's cost times its prior relative to its module's
   mean (scaled by a least-squares fit), so that with few samples the ranking
   degrades to each module's own prior ranking; ridge strength by k-fold
   cross-validation on held-out antithetic pairs. Every sample drops a fixed
   share of each module, so the data rank units *within* a module; how much
   each module matters as a whole comes from the prior term.
5. **removal**: lowest importance per parameter first, until the round's budget
   (round r aims at ``(r + 1) * step`` removed in total, so levels that are
   multiples of `step` are passed through exactly, up to one unit).

With ``n_samples=0`` the prior alone decides (each module loses the same
fraction of its units, lowest prior first): the baseline Bonsai improves on.

Example:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    >>> res = bonsai(params, calib, target=0.2, n_samples=16, key=jax.random.key(0), show_progress=False)
    >>> res.removed_fraction >= 0.2, sorted(res.gates)
    (True, ['ffn', 'heads'])
    >>> small = jp.compact(params, res.gates)
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structured import units as structured
from jaxprune.structured.result import StructuredResult
from jaxprune.core.checks import check_tokens
from jaxprune.errors import InvalidArgumentError
from jaxprune.core.params import Params
from jaxprune.core.progress import progress
from jaxprune.structured.utility import evaluate, perplexity_utility


# ----------------------------------------------------------------------------- sampling

def sampling_weights(prior, alive, candidate):
    """Probability weights of dropping each candidate: max(prior) - prior (+ a floor so the
    strongest candidate can still be drawn), 0 outside the candidates. Arrays [M, n]."""
    p = jnp.where(alive, prior, -jnp.inf)
    top = jnp.max(p, axis=-1, keepdims=True)
    w = jnp.maximum(top - prior, 0.0)
    floor = 1e-3 * jnp.maximum(jnp.max(jnp.where(candidate, w, 0.0), axis=-1, keepdims=True), 1e-12)
    return jnp.where(candidate, w + floor, 0.0)


def antithetic_masks(key, weights, alive, candidate, n_pairs: int):
    """Keep-masks [2 * n_pairs, M, n] in antithetic pairs (rows 2i and 2i+1).

    Row 2i drops half of the candidates of each module m (for an odd count, the extra one
    with probability 1/2), drawn without replacement with probability proportional to
    `weights` (Gumbel top-k); row 2i+1 keeps exactly those and drops the other candidates.
    Fixed units (alive, not candidate) are kept in both, dead units dropped in both.
    """
    k_order, k_odd = jax.random.split(key)
    logits = jnp.where(candidate, jnp.log(jnp.maximum(weights, 1e-30)), -jnp.inf)
    g = jax.random.gumbel(k_order, (n_pairs,) + weights.shape)
    order = jnp.argsort(-(logits + g), axis=-1)
    rank = jnp.argsort(order, axis=-1)
    n_cand = candidate.sum(axis=-1)
    extra = jax.random.bernoulli(k_odd, 0.5, (n_pairs,) + n_cand.shape) & (n_cand % 2 == 1)
    n_drop = n_cand // 2 + extra
    drop = (rank < n_drop[..., None]) & candidate
    keep = alive & ~drop
    complement = alive & (~candidate | drop)
    return jnp.stack([keep, complement], axis=1).reshape((2 * n_pairs,) + weights.shape)


# ----------------------------------------------------------------------------- regression

def ridge(X, y, lam: float, prior=None):
    """argmin_w ||Xc w - yc||^2 + lam ||w - w0||^2 with Xc, yc centred (an intercept, unpenalised).

    `w0` is 0, or with `prior` (a score per column) the prior scaled by its least-squares fit
    ``c = argmin ||Xc (c prior) - yc||^2`` (c >= 0): with little data the solution falls back
    to the prior's ranking instead of to zero. Closed form; through the S x S dual system when
    there are fewer samples S than units."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    Xc, yc = X - X.mean(axis=0), y - y.mean()
    w0 = np.zeros(X.shape[1])
    if prior is not None:
        z = Xc @ np.asarray(prior, np.float64)
        w0 = max(float(z @ yc) / max(float(z @ z), 1e-300), 0.0) * np.asarray(prior, np.float64)
    r = yc - Xc @ w0
    S, P = Xc.shape
    if S < P:
        return w0 + Xc.T @ np.linalg.solve(Xc @ Xc.T + lam * np.eye(S), r)
    return w0 + np.linalg.solve(Xc.T @ Xc + lam * np.eye(P), Xc.T @ r)


def ridge_cv(X, y, lams, folds: int = 5, groups=None, prior=None):
    """Ridge with the strength from `lams` that minimises held-out squared error over `folds`
    folds (samples with the same `groups` id stay together). Returns (w, lam, cv errors)."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    ids = np.unique(groups)
    folds = max(2, min(folds, len(ids)))
    fold_of = {g: i % folds for i, g in enumerate(ids)}
    f = np.array([fold_of[g] for g in groups])
    errors = []
    for lam in lams:
        err = 0.0
        for k in range(folds):
            tr, te = f != k, f == k
            w = ridge(X[tr], y[tr], lam, prior)
            pred = (X[te] - X[tr].mean(axis=0)) @ w + y[tr].mean()
            err += float(np.sum((pred - y[te]) ** 2))
        errors.append(err / len(y))
    best = float(lams[int(np.argmin(errors))])
    return ridge(X, y, best, prior), best, errors


# ----------------------------------------------------------------------------- driver

BonsaiResult = StructuredResult   # the shared result type of structured methods


def _count(params, gates) -> int:
    """Exact non-embedding parameters of the model the 0/1 `gates` leave: `expected_size`, which for
    0/1 gates equals the compacted model's count, without compacting the model every round."""
    return int(round(float(structured.expected_size(params, gates))))


def bonsai(params: Params, calib, target: float = 0.3, *, utility: Callable | None = None,
           kinds=("heads", "ffn"), step: float = 0.05, n_samples: int = 32, key=None,
           submodels_per_batch: int = 8, ridge_grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5),
           folds: int = 5, show_progress=None, callback: Callable | None = None) -> StructuredResult:
    """Remove `target` (a fraction of non-embedding parameters) with Bonsai; see the module doc.

    `calib`: int tokens [N, T] for the prior (and the default utility, negative log-perplexity);
    `utility`: any `utility(params, gates) -> scalar` (traceable, vmapped) or an object with
    `evaluate_batch`; `kinds`: unit kinds from ('heads', 'kv_heads', 'ffn'); `n_samples`:
    sub-models per round (even; 0 = prior only); `key`: the `jax.random` key the samples are drawn
    with (required when ``n_samples > 0``); `submodels_per_batch`: sub-models evaluated at once (vmapped);
    `ridge_grid`: strengths relative to the mean squared norm of a centred sample;
    `callback(record)` is called after every round. Each record of `history` holds the
    round's gates (numpy), so the model at every intermediate size is available.

    Returns a `StructuredResult` (gates, removed_fraction, history, params; ``.compact()``).
    """
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"bonsai needs jaxprune Params, got {type(params).__name__}")
    if not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
        raise InvalidArgumentError(f"target must be a fraction in (0, 1) of non-embedding parameters, got {target!r}")
    if not 0.0 < step <= 0.5:
        raise InvalidArgumentError(f"step must lie in (0, 0.5], got {step!r}")
    if n_samples < 0 or n_samples % 2:
        raise InvalidArgumentError(f"n_samples must be an even number >= 0 (antithetic pairs), got {n_samples!r}")
    kinds = structured.check_kinds(kinds, structured.PRIOR_KINDS)
    calib = jnp.asarray(check_tokens(params.config, calib, what="calib", error=InvalidArgumentError,
                                     check_context=False))
    if n_samples and key is None:
        raise InvalidArgumentError("bonsai samples sub-models: pass key=jax.random.key(seed) (no default seed)")
    utility = perplexity_utility(calib, log=True) if utility is None else utility

    dense = structured.non_embedding_params(params)
    goal = (1.0 - target) * dense
    costs = {k: structured.unit_costs(params, k) for k in kinds}
    gates = structured.ones(params.config, kinds)
    count = dense
    history = []
    rounds = int(np.ceil(target / step - 1e-9))
    bar = progress(range(4 * rounds + 10), "bonsai", total=rounds, enabled=show_progress)
    for rnd in bar:
        if count <= goal:
            break
        t0 = time.perf_counter()
        # Round r aims at (r + 1) * step removed in total, so rounds land on multiples of `step`
        # (whatever a round over- or undershoots, the next one corrects).
        budget = count - max(goal, (1.0 - step * (rnd + 1)) * dense)
        if budget <= 0:
            continue
        pri = structured.prior(params, calib, kinds, gates)
        record = {"round": rnd}
        if n_samples:
            key, sub = jax.random.split(key)
            remove, info = _regression_round(params, utility, gates, pri, costs, budget, step, n_samples, sub,
                                             submodels_per_batch, ridge_grid, folds)
            record.update(info)
        else:
            remove = _prior_round(gates, pri, budget / count)
        gates = {k: jnp.where(remove[k], 0.0, gates[k]) for k in kinds}
        count = _count(params, gates)
        record.update(params_left=count, removed_fraction=1 - count / dense, seconds=time.perf_counter() - t0,
                      gates={k: np.asarray(v) for k, v in gates.items()})
        history.append(record)
        if callback is not None:
            callback(record)
    if count > goal:
        raise InvalidArgumentError(f"bonsai stopped at {1 - count / dense:.1%} removed, short of the target "
                                   f"{target:.1%}: too few prunable units of kinds {kinds}")
    return StructuredResult(gates=gates, removed_fraction=1 - count / dense, history=history, params=params)


def _modules(gates, pri, step):
    """Per kind: alive [L, n], candidate [L, n] (lowest 2*step of each module's alive units by prior)."""
    out = {}
    for k, g in gates.items():
        alive = g > 0
        n_alive = alive.sum(axis=-1)
        n_cand = jnp.maximum(n_alive - jnp.floor(n_alive * (1 - 2 * step)).astype(jnp.int32), jnp.minimum(n_alive, 1))
        score = jnp.where(alive, pri[k], jnp.inf)
        rank = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1)
        out[k] = (alive, alive & (rank < n_cand[:, None]), n_alive)
    return out


def _prior_round(gates, pri, fraction):
    """Each module drops ceil(fraction * alive) of its lowest-prior alive units."""
    remove = {}
    for k, g in gates.items():
        alive = g > 0
        n_drop = jnp.ceil(fraction * alive.sum(axis=-1)).astype(jnp.int32)
        score = jnp.where(alive, pri[k], jnp.inf)
        rank = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1)
        remove[k] = alive & (rank < n_drop[:, None])
    return remove


def _regression_round(params, utility, gates, pri, costs, budget, step, n_samples, key, batch_size,
                      ridge_grid, folds):
    mods = _modules(gates, pri, step)
    samples = {}
    for i, (k, (alive, cand, n_alive)) in enumerate(mods.items()):
        w = sampling_weights(pri[k], alive, cand)
        samples[k] = antithetic_masks(jax.random.fold_in(key, i), w, alive, cand, n_samples // 2)
    scores = evaluate(utility, params, {k: v.astype(jnp.float32) for k, v in samples.items()}, batch_size)
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-1e8, neginf=-1e8, posinf=1e8)
    # Regression over the candidates of every module at once: comparable importances.
    cols = {k: np.flatnonzero(np.asarray(mods[k][1]).reshape(-1)) for k in mods}
    X = np.concatenate([np.asarray(samples[k]).reshape(n_samples, -1)[:, cols[k]] for k in mods], axis=1)
    scale = float(np.mean(np.sum((X - X.mean(axis=0)) ** 2, axis=1))) or 1.0
    relative = {k: np.asarray(pri[k]) / np.maximum(np.asarray(jnp.sum(jnp.where(mods[k][0], pri[k], 0.0), axis=-1)
                                                              / jnp.maximum(mods[k][2], 1))[:, None], 1e-30)
                for k in mods}
    prior_cols = np.concatenate([(relative[k] * costs[k]).reshape(-1)[cols[k]] for k in mods])
    coef, lam, cv = ridge_cv(X, scores, [g * scale for g in ridge_grid], folds, groups=np.arange(n_samples) // 2,
                             prior=prior_cols)
    # Lowest importance per parameter first, until the budget.
    cost = np.concatenate([costs[k].reshape(-1)[cols[k]] for k in mods])
    order = np.argsort(coef / cost, kind="stable")
    n_take = int(np.searchsorted(np.cumsum(cost[order]), budget) + 1)
    chosen = order[:n_take]
    remove, start = {}, 0
    for k in mods:
        flat = np.zeros(np.prod(gates[k].shape), bool)
        picked = chosen[(chosen >= start) & (chosen < start + len(cols[k]))] - start
        flat[cols[k][picked]] = True
        remove[k] = jnp.asarray(flat.reshape(gates[k].shape))
        start += len(cols[k])
    info = {"utility_mean": float(scores.mean()), "utility_best": float(scores.max()), "ridge": lam / scale,
            "cv_mse": float(min(cv)), "candidates": int(X.shape[1])}
    return remove, info
