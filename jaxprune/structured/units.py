"""Prunable structured units: what each costs, and an activation x weight prior.

A unit is one entry of a gate (see `jaxprune.models.gates`): a query head
(``heads``), a key/value group with the query heads that read it
(``kv_heads``), an FFN channel (``ffn``), a whole attention or MLP sublayer
(``attn``, ``mlp``), a layer (``layer``) or a residual-stream dimension
(``hidden``). Removing a unit removes parameters; `unit_costs` gives how many
(non-embedding), so structured targets are fractions of non-embedding
parameters (`non_embedding_params`).

Under GQA (SmolLM2: 9 query heads over 3 K/V groups) a query head costs its
rows of q_proj and o_proj plus a 1/G share of its group's k_proj/v_proj, which
go once every head of the group is gone (`jaxprune.structured.compact` rules); a
``kv_heads`` unit is a group with all its query heads. In MHA models (OPT,
Llama with G = 1) a head carries its own k/v.

The prior (Bonsai's starting point, Wanda-style) scores a unit by the
activation norms entering the output projection times the weight norms of the
rows it owns: for unit u with input features f of o_proj / down_proj (OPT:
out_proj / fc2), ``prior(u) = sum_f ||X_f||_2 * ||W_f,:||_2`` with ||X_f|| the
root mean square of feature f over calibration tokens.

Example:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> unit_costs(params, "ffn").shape, int(unit_costs(params, "ffn")[0, 0])
    ((2, 64), 96)
    >>> pri = prior(params, jnp.ones((2, 8), jnp.int32), ("heads", "ffn"))
    >>> pri["heads"].shape, pri["ffn"].shape
    ((2, 4), (2, 64))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import models
from jaxprune.calibration.capture import capture
from jaxprune.structured.compact import compact, param_count as non_embedding_params
from jaxprune.errors import InvalidArgumentError
from jaxprune.models import gates as gates_lib
from jaxprune.models.layout import layout_of
from jaxprune.core.params import Params

UNIT_KINDS = ("heads", "kv_heads", "ffn", "attn", "mlp", "layer", "hidden")
PRIOR_KINDS = ("heads", "kv_heads", "ffn")

def _size(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _check_uniform(params: Params):
    dims = models.family(params.config).per_layer_dims(params.config)
    if params.config.layer_shapes is not None or any(d != dims[0] for d in dims):
        raise InvalidArgumentError("structured units need a model with uniform layers (compact it at the end, "
                                   "not in between)")


def gate_shapes(config) -> dict:
    """Shape of every gate of a uniform model."""
    L, H = config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or H
    return {"heads": (L, H), "kv_heads": (L, kv), "ffn": (L, config.intermediate_size),
            "attn": (L,), "mlp": (L,), "layer": (L,), "hidden": (config.hidden_size,)}


def check_kinds(kinds, allowed=UNIT_KINDS) -> tuple:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise InvalidArgumentError(f"unit kinds must be a non-empty subset of {allowed}, got {kinds!r}")
    return kinds


def unit_costs(params: Params, kind: str) -> np.ndarray:
    """Non-embedding parameters removed with each unit of `kind` (float array shaped like its gate).

    ``heads`` include a 1/G share of their K/V group under GQA; ``hidden`` counts every
    non-embedding entry on that residual dimension."""
    check_kinds(kind)
    _check_uniform(params)
    cfg = params.config
    lay = layout_of(cfg)
    lp = params.tree["layers"][0]
    shape = gate_shapes(cfg)[kind]
    L = cfg.num_hidden_layers
    if kind in ("attn", "mlp", "layer"):
        a = _size({k: lp[k] for k in lay.sublayer_keys("attn") if k in lp})
        m = _size({k: lp[k] for k in lay.sublayer_keys("mlp") if k in lp})
        return np.full(shape, {"attn": a, "mlp": m, "layer": a + m}[kind], np.float64)
    if kind == "hidden":
        return np.full(shape, _hidden_cost(params), np.float64)
    H = cfg.num_attention_heads
    kv = shape[1] if kind == "kv_heads" else gate_shapes(cfg)["kv_heads"][1]
    per = _per_unit(lay, lp, cfg)
    if kind == "ffn":
        cost = per["ffn"]
    elif kind == "kv_heads":
        cost = (H // kv) * per["heads"] + per["groups"]
    else:
        cost = per["heads"] + per["groups"] / (H // kv)
    return np.full((L, shape[1]), cost, np.float64)


def _per_unit(lay, lp: dict, cfg) -> dict:
    """Entries of one layer's weights on one query head, one K/V group and one FFN channel,
    read off the layout's axis roles (a leaf counts toward a unit when one of its axes runs over it)."""
    units = {"heads": cfg.num_attention_heads, "groups": gate_shapes(cfg)["kv_heads"][1],
             "ffn": cfg.intermediate_size}
    per = dict.fromkeys(units, 0.0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(lp)[0]:
        names = tuple(getattr(k, "key", None) for k in path)
        for role in lay.leaf_roles(names):
            if role in units:
                per[role] += float(np.prod(np.shape(leaf))) / units[role]
    return per


def _hidden_cost(params: Params) -> float:
    """Entries on one residual dimension: what compaction removes with it (same for every dim)."""
    g = {"hidden": jnp.ones((params.config.hidden_size,), jnp.float32).at[0].set(0.0)}
    return float(non_embedding_params(params) - non_embedding_params(compact(params, g)))


def _output_projection_sumsq(params: Params, tokens, gates):
    """Per layer: (sum of squares of o_proj's input features, of down_proj's), over tokens."""
    lay = layout_of(params.config)
    attn_out, mlp_out = lay.output_projection("attn").path, lay.output_projection("mlp").path
    wanted = {attn_out, mlp_out}
    x, ctx = models.embed(params, tokens, gates)
    out = []
    for i in range(len(params.tree["layers"])):
        x, st = capture(lambda: models.layer(params, i, x, ctx, gates), "sumsq", wanted)
        out.append((st.get(attn_out), st.get(mlp_out)))
    return out


_sumsq_jit = jax.jit(_output_projection_sumsq)


def prior(params: Params, tokens, kinds=("heads", "ffn"), gates=None) -> dict:
    """Activation x weight-norm prior per unit (higher = more important), under `gates`.

    Returns {kind: float32 array shaped like its gate}. Units already gated off score 0."""
    kinds = check_kinds(kinds, PRIOR_KINDS)
    _check_uniform(params)
    tokens = jnp.asarray(tokens, jnp.int32)
    cfg = params.config
    lay = layout_of(cfg)
    attn_out, mlp_out = lay.output_projection("attn").path, lay.output_projection("mlp").path
    stats = _sumsq_jit(params, tokens, gates_lib.check_gates(gates) or None)
    n = float(tokens.size)
    H = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or H
    res = {k: [] for k in kinds}
    for lp, (s_attn, s_mlp) in zip(params.tree["layers"], stats):
        if "heads" in kinds or "kv_heads" in kinds:
            w = _row_norms(lp, attn_out)
            per_feat = jnp.sqrt(s_attn / n) * w
            heads = per_feat.reshape(H, -1).sum(axis=1)
            if "heads" in kinds:
                res["heads"].append(heads)
            if "kv_heads" in kinds:
                res["kv_heads"].append(heads.reshape(kv, H // kv).sum(axis=1))
        if "ffn" in kinds:
            res["ffn"].append(jnp.sqrt(s_mlp / n) * _row_norms(lp, mlp_out))
    return {k: jnp.stack(v).astype(jnp.float32) for k, v in res.items()}


def _row_norms(lp: dict, path: tuple):
    d = lp
    for p in path:
        d = d[p]
    return jnp.sqrt(jnp.sum(jnp.square(d["kernel"].astype(jnp.float32)), axis=1))


def ones(config, kinds) -> dict:
    """All-ones float32 gates for `kinds` (everything kept)."""
    shapes = gate_shapes(config)
    return {k: jnp.ones(shapes[k], jnp.float32) for k in check_kinds(kinds)}


def _any(p, axis=-1):
    """P(at least one unit kept) for independent units (exact for 0/1 values)."""
    return 1.0 - jnp.prod(1.0 - p, axis=axis)


def expected_size(params: Params, keep) -> jax.Array:
    """Expected non-embedding parameters of the compacted model when each unit is kept independently
    with probability ``keep[kind]`` (float arrays shaped like the gates; missing kinds are kept).

    Differentiable and jit-able, and exact in expectation over independent Bernoulli gates. For 0/1
    values it equals
    ``param_count(compact(params, keep))`` exactly, following `jaxprune.structured.compact`'s rules: a K/V group
    goes with its last query head (GQA), a sublayer (with its norm and output bias) with its last
    unit, and every weight shrinks with the kept hidden dims.

    Example:
        >>> import jax, jax.numpy as jnp, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> params = jp.init(cfg, jax.random.key(0))
        >>> keep = {"ffn": jnp.ones((2, 64)).at[:, :32].set(0.0)}
        >>> int(expected_size(params, keep)) == non_embedding_params(jp.compact(params, keep))
        True
        >>> float(expected_size(params, {"ffn": jnp.full((2, 64), 0.5)}))   # half the FFN, on average
        12448.0
    """
    _check_uniform(params)
    cfg = params.config
    unknown = set(keep) - set(UNIT_KINDS)
    if unknown:
        raise InvalidArgumentError(f"unknown unit kinds {sorted(unknown)}; valid kinds are {list(UNIT_KINDS)}")
    shapes = gate_shapes(cfg)
    p = {k: jnp.asarray(keep[k], jnp.float32) if k in keep else jnp.ones(shapes[k], jnp.float32)
         for k in UNIT_KINDS}
    for k, v in p.items():
        if v.shape != shapes[k]:
            raise InvalidArgumentError(f"keep[{k!r}] has shape {list(v.shape)}; this model needs {list(shapes[k])}")
    L, H, Dh = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    kv = shapes["kv_heads"][1]
    group_kept = p["kv_heads"] * _any(p["heads"].reshape(L, kv, H // kv))      # a group and one of its heads
    q = p["heads"] * jnp.repeat(p["kv_heads"], H // kv, axis=1)                 # query heads [L, H]
    count = {"hidden": p["hidden"].sum(), "heads": q.sum(1) * Dh,
             "groups": group_kept.sum(1) * Dh, "ffn": p["ffn"].sum(1)}
    present = {"attn": p["layer"] * p["attn"], "mlp": p["layer"] * p["mlp"]}
    any_unit = {"attn": _any(group_kept), "mlp": _any(p["ffn"])}
    lay = layout_of(cfg)
    total = jnp.zeros((), jnp.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params.tree["layers"][0])[0]:
        names = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        roles = lay.leaf_roles(names)
        sub = lay.sublayer_of(names[0])
        size = jnp.prod(jnp.stack([(count[r] if r in count else float(n)) * jnp.ones(L)
                                   for r, n in zip(roles, np.shape(leaf))]), axis=0)
        owns_units = bool(set(roles) & {"heads", "groups", "ffn"})
        gate = present[sub] * (1.0 if owns_units else any_unit[sub])   # norms, output biases: with the sublayer
        total = total + jnp.sum(gate * size)
    for key, node in params.tree.items():
        if key in ("layers",) + lay.embeddings:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(node)[0]:
            names = (key,) + tuple(getattr(k, "key", None) for k in path)
            sizes = [count["hidden"] if r == "hidden" else float(n) for r, n in zip(lay.top_roles(names), leaf.shape)]
            total = total + jnp.prod(jnp.stack(sizes))
    return total
