"""Structured L0 pruning: learn HardConcrete gates with a Lagrangian size target
(CoFi, Xia et al. 2022; Sheared-LLaMA, Xia et al. 2024).

Every unit (query head, K/V group, FFN channel, hidden dimension, sublayer or
layer; see `jaxprune.structured.units`) gets a gate ``z ~ HardConcrete(log_alpha)``
(`jaxprune.structured.hardconcrete`). Each training step samples one set of gates, runs the
gated forward (`jaxprune.models.forward`), and minimises

    LM loss (or KL to the dense model) + sum_c lambda1_c * (s_c - t_c) + lambda2_c * (s_c - t_c)^2

where ``s_c`` is an expected size as a fraction of the dense model's and
``t_c`` its target, moved linearly over ``warmup`` steps from the initial gates'
expected size (near dense) to the final value.
With a plain ``target`` the one constraint is the expected number of
non-embedding parameters (`jaxprune.structured.units.expected_size`, GQA-aware).
With a ``target_config`` (a smaller architecture: layers, heads, K/V heads, FFN
width, hidden size) there is one constraint per kind on the expected number of
units. The lambdas follow gradient *ascent* (`ascent`), so a constraint that
stays violated gets an ever larger price.

`l0_optimizer` is one `optax.multi_transform` over ``{"params", "log_alphas",
"lambdas"}``; `l0_loss` is the differentiable objective, so the step (`l0_step`)
composes with any optax optimiser and any loop. `final_gates` turns learned
log-alphas into deterministic 0/1 gates that hit the target exactly: the units
with the highest log-alpha under one global threshold for a size target (the
largest model not above it), the top-k per layer for a target architecture.
`l0_prune` runs the whole loop; `jaxprune.structured.compact` then slices the model.

Example:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    >>> res = l0_prune(params, calib, target=0.3, steps=20, batch_size=2, key=jax.random.key(0), show_progress=False)
    >>> res.removed_fraction >= 0.3, sorted(res.gates)
    (True, ['ffn', 'heads', 'hidden', 'layer'])
    >>> small = jp.compact(res.params, res.gates)
"""

from __future__ import annotations

import dataclasses

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.structured import hardconcrete as hc
from jaxprune.core.checks import check_tokens
from jaxprune.errors import InvalidArgumentError
from jaxprune.models import layout_of
from jaxprune.core.params import Params
from jaxprune.core.progress import progress
from jaxprune.structured.result import StructuredResult
from jaxprune.structured.units import check_kinds, expected_size, gate_shapes, non_embedding_params
from jaxprune.training.masked import distillation_loss, lm_loss, random_batch

DEFAULT_KINDS = ("heads", "ffn", "hidden", "layer")
LOG_ALPHA_LIMIT = 5.0
_ARCH_FIELDS = {"layer": "num_hidden_layers", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "hidden": "hidden_size"}

__all__ = ["L0Result", "ascent", "final_gates", "init_log_alphas", "l0_loss", "l0_optimizer", "l0_prune",
           "l0_step", "lagrangian", "size_targets", "warmed_targets"]


@dataclasses.dataclass(frozen=True)
class L0Result(StructuredResult):
    """A `StructuredResult` whose `params` are the weights after training (unchanged when
    ``train_params=False``) and whose `gates` are the deterministic 0/1 gates hitting the target;
    `history` has one record per logged step (step, loss, data (LM or KL), expected sizes,
    targets, lambdas). Also the learned `log_alphas` and the final `lambdas`."""

    log_alphas: dict = dataclasses.field(default_factory=dict)
    lambdas: dict = dataclasses.field(default_factory=dict)


def init_log_alphas(config, kinds=DEFAULT_KINDS, init: float = 3.0, key=None, noise: float = 0.01) -> dict:
    """Gate parameters for `kinds`, all ``init`` (plus ``noise`` x N(0, 1) when a key is given).

    ``init=3`` keeps a gate nonzero with probability 0.99 and exactly 1 with 0.80, so training
    starts close to the dense model (CoFi starts at 0: half the network switched off on average)."""
    shapes = gate_shapes(config)
    kinds = check_kinds(kinds)
    keys = jax.random.split(key, len(kinds)) if key is not None else [None] * len(kinds)
    return {k: jnp.full(shapes[k], init, jnp.float32)
            + (noise * jax.random.normal(kk, shapes[k]) if kk is not None else 0.0)
            for k, kk in zip(kinds, keys)}


def lagrangian(s, t, lam):
    """``lam[0] * (s - t) + lam[1] * (s - t) ** 2`` (minimised over s, maximised over lam)."""
    return lam[0] * (s - t) + lam[1] * (s - t) ** 2


def size_targets(params: Params, target: float | None = None, target_config=None, kinds=DEFAULT_KINDS) -> dict:
    """Final targets as kept fractions: {"size": 1 - target} or one entry per kind of `target_config`."""
    if (target is None) == (target_config is None):
        raise InvalidArgumentError("give exactly one of target (fraction of non-embedding parameters to "
                                   "remove) or target_config (a smaller architecture)")
    if target_config is not None:
        check_kinds(kinds, ("heads", "kv_heads", "ffn", "hidden", "layer"))
    if target is not None:
        if not 0.0 < float(target) < 1.0:
            raise InvalidArgumentError(f"target must be a fraction in (0, 1) of parameters to remove, got {target!r}")
        return {"size": 1.0 - float(target)}
    return {k: n / d for k, (n, d) in _arch_counts(params.config, target_config, kinds).items()}


def _arch_counts(cfg, tgt, kinds) -> dict:
    """{kind: (target units in total, dense units in total)} for a target architecture."""
    if type(tgt) is not type(cfg):
        raise InvalidArgumentError(f"target_config must be a {type(cfg).__name__}, got {type(tgt).__name__}")
    fields = dict(_ARCH_FIELDS, ffn=layout_of(cfg).config_widths["ffn"])
    L, Lt = cfg.num_hidden_layers, tgt.num_hidden_layers
    out = {}
    for kind, field in fields.items():
        have, want = getattr(cfg, field, None), getattr(tgt, field, None)
        if have is None or want == have:
            continue
        if kind not in kinds:
            raise InvalidArgumentError(f"target_config changes {field} ({have} -> {want}) but {kind!r} units "
                                       f"are not trained (kinds={tuple(kinds)})")
        if not 0 < want < have:
            raise InvalidArgumentError(f"target_config.{field} must be between 1 and {have}, got {want}")
        per_layer = kind not in ("layer", "hidden")
        out[kind] = (want * (Lt if per_layer else 1), have * (L if per_layer else 1))
    if not out:
        raise InvalidArgumentError("target_config is not smaller than the model in any trained kind")
    return out


def warmed_targets(targets: dict, step, warmup: int, start: dict | None = None) -> dict:
    """Targets moved linearly from `start` (default 1, dense) at step 0 to their final value at
    `warmup`. `l0_prune` starts from the initial gates' expected sizes, so the constraint holds
    from the first step and the lambdas start at their equilibrium (zero)."""
    frac = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(int(warmup), 1))
    start = start or {}
    return {k: start.get(k, 1.0) + (t - start.get(k, 1.0)) * frac for k, t in targets.items()}


def expected_fractions(params: Params, log_alphas: dict, names) -> dict:
    """Expected kept fraction for each constraint name ('size' or a unit kind), differentiable."""
    p = {k: hc.prob_nonzero(v) for k, v in log_alphas.items()}
    cfg = params.config
    L = cfg.num_hidden_layers
    layer = p.get("layer", jnp.ones(L))
    out = {}
    for name in names:
        if name == "size":
            out[name] = expected_size(params, p) / non_embedding_params(params)
        elif name in ("layer", "hidden"):
            out[name] = jnp.mean(p[name])
        else:                                   # per-layer units count only in layers that stay
            out[name] = jnp.sum(layer[:, None] * p[name]) / p[name].size
    return out


def sample_gates(key, log_alphas: dict) -> dict:
    """One HardConcrete draw for every gate."""
    keys = jax.random.split(key, len(log_alphas))
    return {k: hc.sample(kk, v) for kk, (k, v) in zip(keys, sorted(log_alphas.items()))}


def l0_loss(trainable: dict, batch, key, step, teacher: Params | None = None, *, config, targets: dict,
            warmup: int, start: dict | None = None, temperature: float = 1.0):
    """The L0 objective of ``trainable = {"params": tree, "log_alphas": ..., "lambdas": ...}``.

    Returns (loss, metrics). `config` is the model's; `targets` the final kept fractions
    (`size_targets`), reached linearly from `start` over `warmup` steps; `teacher` (dense params), when given, switches the data loss from the
    LM loss to KL(teacher || student)."""
    model = Params(config, trainable["params"])
    gates = sample_gates(key, trainable["log_alphas"])
    if teacher is None:
        data = lm_loss(model, batch, gates)
    else:
        data = distillation_loss(model, teacher, batch, gates, temperature)
    t = warmed_targets(targets, step, warmup, start)
    s = expected_fractions(model, trainable["log_alphas"], targets)
    lag = sum(lagrangian(s[k], t[k], trainable["lambdas"][k]) for k in targets)
    metrics = {"loss": data + lag, "data": data, "expected": s, "target": t}
    return data + lag, metrics


def ascent(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` turned into gradient ascent (its updates negated), for Lagrange multipliers."""
    return optax.chain(tx, optax.scale(-1.0))


def l0_optimizer(lr_params: float = 2e-5, lr_gates: float = 0.1, lr_lambdas: float = 20.0,
                 train_params: bool = True, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """`optax.multi_transform` over ``{"params", "log_alphas", "lambdas"}``: AdamW on the weights
    (frozen with ``train_params=False``), Adam on the gates, plain gradient *ascent* on the lambdas.

    Plain ascent moves lambda1 in proportion to the violation ``s - t`` (Adam would move it by
    about its learning rate whatever the violation), so the price rises quickly while the model
    is too large and falls as quickly once it is below target."""
    return optax.multi_transform(
        {"params": optax.adamw(lr_params, weight_decay=weight_decay) if train_params else optax.set_to_zero(),
         "log_alphas": optax.adam(lr_gates),
         "lambdas": ascent(optax.sgd(lr_lambdas))},
        {"params": "params", "log_alphas": "log_alphas", "lambdas": "lambdas"})


# The default optimisers as values (not rebuilt per call), so `l0_prune`'s step compiles once.
_DEFAULT_OPTIMIZERS = {True: l0_optimizer(train_params=True), False: l0_optimizer(train_params=False)}


def _labels(trainable: dict) -> dict:
    return {k: jax.tree.map(lambda _: k, v) for k, v in trainable.items()}


@partial(jax.jit, static_argnames=("optimizer", "config", "targets", "warmup", "start", "temperature"))
def _l0_update(trainable, opt_state, batch, key, step, teacher, *, optimizer, config, targets, warmup, start,
               temperature):
    """One L0 step, compiled once per optimizer, config, settings and shapes. `targets` and `start`
    come as tuples of (name, value) items (hashable; dicts again here, in their order)."""
    grads, metrics = jax.grad(l0_loss, has_aux=True)(trainable, batch, key, step, teacher, config=config,
                                                     targets=dict(targets), warmup=warmup,
                                                     start=None if start is None else dict(start),
                                                     temperature=temperature)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    trainable = dict(trainable,
                     log_alphas=jax.tree.map(lambda a: jnp.clip(a, -LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT),
                                             trainable["log_alphas"]),
                     lambdas=jax.tree.map(lambda a: jnp.maximum(a, 0.0), trainable["lambdas"]))
    return trainable, opt_state, metrics


def l0_step(optimizer: optax.GradientTransformation, *, config, targets: dict, warmup: int,
            start: dict | None = None, temperature: float = 1.0) -> Callable:
    """A jitted ``step(trainable, opt_state, batch, key, step, teacher=None) -> (trainable,
    opt_state, metrics)`` with `l0_loss` (config, targets, warmup, start, temperature as there)
    and any optax `optimizer` over `trainable`.

    The step is one module-level jitted function: steps built for the same optimizer object and
    the same settings share its compiled program. The settings, `targets` and `start` included,
    are static (their arithmetic stays in Python floats), so other starting sizes compile anew.

    After each update the log-alphas are clipped to +-LOG_ALPHA_LIMIT (as in CoFi), so a gate
    pushed far past 0 or 1 can return, and the lambdas are projected onto >= 0: the language
    loss always prefers a larger model, so the size constraint binds from above and a negative
    price would only wind up (the quadratic term still pulls an undershoot back to the target)."""
    static = dict(optimizer=optimizer, config=config, targets=tuple((k, float(v)) for k, v in targets.items()),
                  warmup=warmup, start=None if start is None else tuple((k, float(v)) for k, v in start.items()),
                  temperature=temperature)

    def step_fn(trainable, opt_state, batch, key, step, teacher=None):
        return _l0_update(trainable, opt_state, batch, key, step, teacher, **static)

    return step_fn


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """0/1 mask of the k largest entries along the last axis (ties: lower index kept)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    mask = np.zeros_like(scores, np.float32)
    np.put_along_axis(mask, order, 1.0, axis=-1)
    return mask


def _architecture_gates(cfg, tgt, la: dict) -> dict:
    """Top-k gates giving exactly `tgt`'s widths; query heads only from kept K/V groups, and the
    same number per group when the target's heads divide evenly over its groups."""
    width = {"layer": tgt.num_hidden_layers, "hidden": tgt.hidden_size,
             "ffn": getattr(tgt, layout_of(cfg).config_widths["ffn"])}
    out = {k: _top_k_mask(v, width[k]) for k, v in la.items() if k in width}
    H, KV = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    Ht, KVt = tgt.num_attention_heads, getattr(tgt, "num_key_value_heads", None) or tgt.num_attention_heads
    groups = np.ones((cfg.num_hidden_layers, KV), np.float32)
    if "kv_heads" in la:
        groups = out["kv_heads"] = _top_k_mask(la["kv_heads"], KVt)
    if "heads" in la:
        kept_kv = int(groups[0].sum())
        scores = np.where(np.repeat(groups, H // KV, axis=1) > 0, la["heads"], -np.inf)
        if Ht % kept_kv == 0:                  # equal groups: the best Ht / KVt heads of each kept group
            per_group = _top_k_mask(scores.reshape(-1, KV, H // KV), Ht // kept_kv)
            out["heads"] = (per_group * groups[..., None]).reshape(-1, H)
        else:
            out["heads"] = _top_k_mask(scores, Ht)
    return out


def final_gates(params: Params, log_alphas: dict, target: float | None = None, target_config=None) -> dict:
    """Deterministic 0/1 gates from learned log-alphas that hit the target exactly.

    A size target keeps every unit whose log-alpha is at least one global threshold, the lowest
    threshold whose compacted model has at most ``(1 - target)`` of the non-embedding parameters,
    then spends what is left of that budget on the best removed FFN channels of the MLPs that stay,
    so the model is at most the target size and within one FFN channel of it. A target architecture
    keeps the top layers, then in each layer the top heads / K/V heads / FFN channels, and the top
    hidden dims, by log-alpha: exactly its widths."""
    la = {k: np.asarray(v, np.float32) for k, v in log_alphas.items()}
    if target_config is not None:
        size_targets(params, None, target_config, tuple(la))          # validates
        return {k: jnp.asarray(v) for k, v in _architecture_gates(params.config, target_config, la).items()}
    keep_frac = size_targets(params, target)["size"]
    budget = keep_frac * non_embedding_params(params)
    thresholds = np.unique(np.concatenate([v.ravel() for v in la.values()]))

    def gates_at(i):
        g = {k: (v >= thresholds[i]).astype(np.float32) for k, v in la.items()}
        for k in ("layer", "hidden"):            # a model keeps at least one layer and one hidden dim
            if k in g:
                g[k][np.argmax(la[k])] = 1.0
        return g

    def fits(i):
        return float(expected_size(params, gates_at(i))) <= budget

    lo, hi = 0, len(thresholds)        # find the smallest threshold index whose model fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    if lo == len(thresholds):
        raise InvalidArgumentError(f"no gate setting of kinds {sorted(la)} reaches target {target}")
    g = gates_at(lo)
    if "ffn" in g:
        _fill_ffn(params, g, la["ffn"], budget)
    return {k: jnp.asarray(v) for k, v in g.items()}


def _fill_ffn(params: Params, g: dict, la_ffn: np.ndarray, budget: float) -> None:
    """Use the budget left under the threshold: give back the best removed FFN channels of MLPs
    that stay (each costs the same there), so the size lands within one channel of the target."""
    size = lambda: float(expected_size(params, g))
    live = g["ffn"].any(axis=1)
    if "layer" in g:
        live &= g["layer"] > 0
    if "mlp" in g:
        live &= g["mlp"] > 0
    cand = np.argwhere((g["ffn"] == 0) & live[:, None])
    if not len(cand):
        return
    before = size()
    l, j = cand[0]
    g["ffn"][l, j] = 1.0
    cost = size() - before
    g["ffn"][l, j] = 0.0
    n = int((budget - before) // cost) if cost > 0 else 0
    order = np.argsort(-la_ffn[cand[:, 0], cand[:, 1]], kind="stable")[:n]
    g["ffn"][cand[order, 0], cand[order, 1]] = 1.0


def l0_prune(params: Params, calib, target: float | None = None, *, target_config=None,
             kinds=DEFAULT_KINDS, steps: int = 200, batch_size: int = 4, warmup: int | None = None,
             optimizer: optax.GradientTransformation | None = None, train_params: bool = True,
             distill: bool = False, temperature: float = 1.0, init: float = 3.0, key=None,
             log_every: int = 10, show_progress: bool | None = None, callback=None) -> L0Result:
    """Learn structured gates (and, by default, the weights) with an L0 Lagrangian, then fix them.

    Args:
      params: a uniform model (`jaxprune.load`).
      calib: int windows [N, T]; each step draws `batch_size` of them at random.
      target: fraction of non-embedding parameters to remove; or `target_config`: a smaller
        config of the same family (layers, heads, K/V heads, FFN width, hidden size).
      kinds: unit kinds with gates (`jaxprune.structured.units.UNIT_KINDS`).
      steps, warmup: training steps; the target moves linearly from the initial expected size to
        its final value over `warmup` steps (default steps / 2).
      optimizer: over ``{"params", "log_alphas", "lambdas"}``; default `l0_optimizer(train_params=...)`.
      distill: KL to the dense model's logits instead of the LM loss.
      key: `jax.random` key for gate noise and batches (required: no default seed).
      callback: called as ``callback(record)`` every `log_every` steps (the record also goes in `history`).

    Returns an `L0Result` (a `StructuredResult`); ``result.compact()`` is the smaller model.
    """
    kinds = check_kinds(kinds)
    targets = size_targets(params, target, target_config, kinds)
    calib = jnp.asarray(check_tokens(params.config, calib, what="calib", error=InvalidArgumentError,
                                     check_context=False))
    if int(steps) < 1 or int(batch_size) < 1:
        raise InvalidArgumentError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    warmup = max(1, int(steps) // 2) if warmup is None else int(warmup)
    if key is None:
        raise InvalidArgumentError("l0_prune samples gates and batches: pass key=jax.random.key(seed) (no default seed)")
    key, init_key = jax.random.split(key)
    trainable = {"params": params.tree, "log_alphas": init_log_alphas(params.config, kinds, init, init_key),
                 "lambdas": {k: jnp.zeros(2, jnp.float32) for k in targets}}
    optimizer = optimizer or _DEFAULT_OPTIMIZERS[bool(train_params)]
    opt_state = optimizer.init(trainable)
    start = {k: float(v) for k, v in expected_fractions(params, trainable["log_alphas"], targets).items()}
    step_fn = l0_step(optimizer, config=params.config, targets=targets, warmup=warmup, start=start,
                      temperature=temperature)
    teacher = params if distill else None
    history = []
    for step in progress(range(int(steps)), "L0 training", total=int(steps), enabled=show_progress):
        key, kb, kg = jax.random.split(key, 3)
        batch = random_batch(kb, calib, batch_size)
        trainable, opt_state, m = step_fn(trainable, opt_state, batch, kg, step, teacher)
        if step % log_every == 0 or step == steps - 1:
            rec = {"step": step, "loss": float(m["loss"]), "data": float(m["data"]),
                   "expected": {k: float(v) for k, v in m["expected"].items()},
                   "target": {k: float(v) for k, v in m["target"].items()},
                   "lambdas": {k: [float(x) for x in v] for k, v in trainable["lambdas"].items()}}
            history.append(rec)
            if callback is not None:
                callback(rec)
    trained = Params(params.config, trainable["params"])
    gates = final_gates(trained, trainable["log_alphas"], target, target_config)
    removed = 1.0 - float(expected_size(trained, gates)) / non_embedding_params(trained)
    return L0Result(gates=gates, removed_fraction=removed, history=history, params=trained,
                    log_alphas=trainable["log_alphas"], lambdas=trainable["lambdas"])
