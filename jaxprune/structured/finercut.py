"""FinerCut (Zhang et al. 2024): greedy removal of attention and MLP sublayers.

Every attention and every MLP sublayer is a candidate. Each step removes the
candidate whose removal (on top of the ones already removed) changes the model's
next-token distributions least: the mean Jensen-Shannon divergence to the dense
model's distributions over all calibration positions. The whole removal order is
returned, so one run serves every depth: `result.gates_after(k)` switches the first
`k` removals off through the `attn` / `mlp` gates of `jaxprune.forward`.

Cost per step: one forward over the calibration tokens per remaining candidate;
all candidates of a step go through one jit-compiled call (`lax.map` over
chunks of `submodels_per_batch` candidates, each chunk `vmap`-ed over gates). A full
ordering of an L-layer model is about `2L * (2L + 1) / 2` such forwards.

Memory: the dense log-probabilities are held once, float32 [N, T, V]
(4 x 256 tokens x 49152 vocab = 0.2 GB for SmolLM2); candidate logits exist only
one sequence at a time per candidate of a chunk, `submodels_per_batch` x [T, V] (plus
softmax temporaries). The reference implementation calibrates on 10 WikiText
samples of 256 tokens; 4-10 windows of 256 tokens (`calibration_windows(...,
n=4, seqlen=256)`) is the suggested default here.

JSD: float32, natural log, from log-softmax:
`0.5 * KL(p || m) + 0.5 * KL(q || m)` with `m = (p + q) / 2`, summed over the
vocabulary and averaged over every position (all `T` of every window).

Example:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16)
    >>> res = finercut(params, tokens, n_remove=2, show_progress=False)
    >>> len(res.order), len(res.divergences), res.params_removed[1] > res.params_removed[0]
    (2, 2, True)
    >>> g = res.gates_after(1)                         # the first removal applied
    >>> float(g["attn"].sum() + g["mlp"].sum())
    3.0
    >>> jp.forward(params, tokens, g).shape
    (2, 16, 64)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structured.compact import param_count as non_embedding_params
from jaxprune.structured.result import StructuredResult
from jaxprune.core.checks import check_tokens
from jaxprune.errors import InvalidArgumentError
from jaxprune.models import hidden_states, unembed
from jaxprune.models.layout import layout_of
from jaxprune.core.params import Params
from jaxprune.core.progress import progress

KINDS = ("attn", "mlp")

def sublayer_params(params: Params) -> dict[tuple[str, int], int]:
    """Parameter count of every present sublayer, its own norm included: {(kind, layer): n}.

    Llama: attn = self_attn + input_layernorm, mlp = mlp + post_attention_layernorm;
    OPT: attn = self_attn + self_attn_layer_norm, mlp = fc1 + fc2 + final_layer_norm.
    Sublayers already removed by compaction (absent) are left out.
    """
    lay = layout_of(params.config)
    keys = {kind: lay.sublayer_keys(kind) for kind in KINDS}
    out = {}
    for i, lp in enumerate(params.tree["layers"]):
        for kind in KINDS:
            if keys[kind][0] in lp:
                out[(kind, i)] = sum(int(np.prod(np.shape(x))) for k in keys[kind] if k in lp
                                     for x in jax.tree.leaves(lp[k]))
    return out


@dataclasses.dataclass(frozen=True)
class FinerCutResult(StructuredResult):
    """A FinerCut removal order: a `StructuredResult` whose `gates` apply every removal made,
    plus the order itself, so one run serves every depth (`gates_after(k)`).

    order: sublayers in removal order, ("attn", i) or ("mlp", i).
    divergences: mean JSD to the dense model after each removal.
    params_removed: cumulative parameters removed after each removal.
    num_layers: decoder layers of the model (length of the gates).
    total_params: the model's non-embedding parameters (`params_removed[k] / total_params`
      is the removed fraction).
    """

    order: list = dataclasses.field(default_factory=list)
    divergences: list = dataclasses.field(default_factory=list)
    params_removed: list = dataclasses.field(default_factory=list)
    num_layers: int = 0
    total_params: int = 0

    def gates_after(self, k: int | None = None) -> dict:
        """Gates {"attn": [L], "mlp": [L]} (float32) with the first `k` removals (default: all) set to 0."""
        if k is None:
            k = len(self.order)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= len(self.order):
            raise InvalidArgumentError(f"k must be an int in [0, {len(self.order)}], got {k!r}")
        return {kind: jnp.asarray(a) for kind, a in _gate_arrays(self.order[:k], self.num_layers).items()}


def _gate_arrays(removed, num_layers: int) -> dict:
    g = {kind: np.ones(num_layers, np.float32) for kind in KINDS}
    for kind, i in removed:
        g[kind][i] = 0.0
    return g


def jsd(logp, logq):
    """Jensen-Shannon divergence (nats) between log-distributions over the last axis."""
    logp, logq = logp.astype(jnp.float32), logq.astype(jnp.float32)
    logm = jnp.logaddexp(logp, logq) - math.log(2.0)
    kl = lambda la: jnp.sum(jnp.exp(la) * (la - logm), axis=-1)
    return 0.5 * kl(logp) + 0.5 * kl(logq)


@jax.jit
def _dense_logprobs(params, tokens):
    """Dense log-softmax [N, T, V], float32, one sequence at a time."""
    def one(t):
        x = hidden_states(params, t[None])
        return jax.nn.log_softmax(unembed(params, x)[0].astype(jnp.float32), axis=-1)
    return jax.lax.map(one, tokens)


def _mean_jsd(params, tokens, dense_logp, gates):
    """Mean JSD over all positions between the gated model and `dense_logp`.

    Logits are formed one sequence at a time, so a candidate holds [T, V] of them.
    """
    h = hidden_states(params, tokens, gates)

    def one(args):
        hs, lp = args
        lq = jax.nn.log_softmax(unembed(params, hs[None], gates)[0].astype(jnp.float32), axis=-1)
        return jnp.sum(jsd(lp, lq))

    return jnp.sum(jax.lax.map(one, (h, dense_logp))) / (tokens.shape[0] * tokens.shape[1])


@partial(jax.jit, static_argnames="batch_size")
def _candidate_divergences(params, tokens, dense_logp, cand_gates, n_valid, batch_size: int):
    """Mean JSD of every candidate gates row (dict of [C, L], C a multiple of `batch_size`).

    `lax.map` over chunks of `submodels_per_batch` candidates, each chunk vmapped; chunks at or
    beyond `n_valid` are skipped (inf), so one compilation serves every step.
    """
    C, L = cand_gates["attn"].shape
    chunks = jax.tree.map(lambda a: a.reshape(C // batch_size, batch_size, L), cand_gates)
    live = jnp.arange(C // batch_size) * batch_size < n_valid
    per_gates = jax.vmap(lambda g: _mean_jsd(params, tokens, dense_logp, g))

    def chunk(args):
        g, alive = args
        return jax.lax.cond(alive, per_gates, lambda g: jnp.full((batch_size,), jnp.inf, jnp.float32), g)

    return jax.lax.map(chunk, (chunks, live)).reshape(C)


def _check_tokens(params: Params, calib) -> np.ndarray:
    # RoPE models run past max_position_embeddings; learned positions (OPT) cannot.
    return check_tokens(params.config, calib, what="calib", error=InvalidArgumentError, min_len=1,
                        check_context="embed_positions" in params.tree)


def _check_stop(n_remove, target, n_sublayers: int):
    if n_remove is not None and target is not None:
        raise InvalidArgumentError("give n_remove or target, not both")
    if n_remove is not None and (isinstance(n_remove, bool) or not isinstance(n_remove, numbers.Integral)
                                 or not 1 <= n_remove <= n_sublayers):
        raise InvalidArgumentError(f"n_remove must be an int in [1, {n_sublayers}] (the model's sublayers), got {n_remove!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, numbers.Real)
                               or not 0.0 < target < 1.0):
        raise InvalidArgumentError(f"target must be a fraction in (0, 1) of the non-embedding parameters, got {target!r}")


def _stacked_candidates(removed, remaining, num_layers: int, size: int) -> dict:
    """Gates [size, L] of `removed` plus each remaining candidate; rows past the candidates repeat the base."""
    base = _gate_arrays(removed, num_layers)
    out = {kind: np.repeat(base[kind][None], size, axis=0) for kind in KINDS}
    for row, (kind, i) in enumerate(remaining):
        out[kind][row, i] = 0.0
    return {kind: jnp.asarray(a) for kind, a in out.items()}


def finercut(params: Params, calib, n_remove: int | None = None, target: float | None = None,
             submodels_per_batch: int = 8, show_progress: bool | None = None,
             callback: Callable | None = None) -> FinerCutResult:
    """Greedy FinerCut removal order of attention and MLP sublayers.

    Args:
      params: model params (`jaxprune.load` / `jaxprune.models.init`); Llama or OPT.
      calib: int [N, T] calibration windows (e.g. `jaxprune.calibration_windows`).
      n_remove: stop after this many removals (1 .. number of sublayers).
      target: stop once the removed sublayers hold at least this fraction, in (0, 1),
        of the non-embedding parameters. With neither, every sublayer is ranked.
      submodels_per_batch: candidates evaluated at once (vmapped); bounds memory.
      show_progress: progress bar per step; None shows it on a terminal.
      callback: ``callback(record)`` after every removal (the record also goes in `history`).

    Returns:
      A `FinerCutResult` (a `StructuredResult`); `result.gates_after(k)` are the gates of the
      first k removals.
    """
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"finercut needs jaxprune Params, got {type(params).__name__}")
    tokens = _check_tokens(params, calib)
    sizes = sublayer_params(params)
    candidates = sorted(sizes, key=lambda c: (c[1], KINDS.index(c[0])))
    _check_stop(n_remove, target, len(candidates))
    batch_size = submodels_per_batch
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InvalidArgumentError(f"submodels_per_batch must be a positive int, got {batch_size!r}")
    batch_size = min(int(batch_size), len(candidates))
    L, total = len(params.tree["layers"]), non_embedding_params(params)
    padded = -(-len(candidates) // batch_size) * batch_size
    tokens = jnp.asarray(tokens)
    dense = _dense_logprobs(params, tokens)

    steps = n_remove if n_remove is not None else len(candidates)
    order, divergences, removed_params, history = [], [], [], []
    for _ in progress(range(steps), "FinerCut", total=steps, enabled=show_progress):
        remaining = [c for c in candidates if c not in order]
        stacked = _stacked_candidates(order, remaining, L, padded)
        div = np.asarray(_candidate_divergences(params, tokens, dense, stacked, len(remaining), batch_size))
        div = np.where(np.isnan(div[:len(remaining)]), np.inf, div[:len(remaining)])
        best = int(np.argmin(div))
        order.append(remaining[best])
        divergences.append(float(div[best]))
        removed_params.append((removed_params[-1] if removed_params else 0) + sizes[remaining[best]])
        record = {"step": len(order), "removed": remaining[best], "divergence": divergences[-1],
                  "params_removed": removed_params[-1], "removed_fraction": removed_params[-1] / total}
        history.append(record)
        if callback is not None:
            callback(record)
        if target is not None and removed_params[-1] >= target * total:
            break
    gates = {kind: jnp.asarray(a) for kind, a in _gate_arrays(order, L).items()}
    return FinerCutResult(gates=gates, removed_fraction=(removed_params[-1] / total) if order else 0.0,
                          history=history, params=params, order=order, divergences=divergences,
                          params_removed=removed_params, num_layers=L, total_params=total)
