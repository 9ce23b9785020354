"""Structured compaction: slice the units that gates remove out of a model.

`compact(params, gates)` returns a smaller dense `Params` whose logits equal the
gated model's, `jaxprune.models.forward(params, tokens, gates)` (see
`jaxprune.models.gates` for the keys). Rules:

* A query head is removed when its ``heads`` gate is 0 or its K/V group's
  ``kv_heads`` gate is 0. A K/V group is removed when its gate is 0 or all its
  query heads are removed.
* The attention sublayer is removed (the layer loses ``self_attn`` and its input
  norm and is the identity there, i.e. ``n_heads = 0``) when its ``attn`` or
  ``layer`` gate is 0 or all its heads are removed; the MLP likewise when its
  ``mlp`` or ``layer`` gate is 0 or all its ``ffn`` channels are 0. A layer that
  loses both sublayers is dropped (``num_hidden_layers`` shrinks).
* Hidden dims whose ``hidden`` gate is 0 are sliced from everything: token and
  (OPT) position embeddings or ``project_in``/``project_out``, every norm, the
  input and output side of every kernel, the LM head. ``hidden`` must be binary.
* Non-zero gates other than 1 are folded into weights: a head's gate (times its
  group's) scales its rows of ``o_proj``/``out_proj``, an FFN channel's gate its
  row of ``down_proj``/``fc2``, a sublayer's gate (times the layer gate) its whole
  output projection, bias included. Post-LN OPT cannot fold a sublayer gate
  (``s * LN(x + f(x)) + (1 - s) * x``), so there it must be 0 or 1.
* ``head_dim`` never changes (``head_dim_override`` is set when it would).
* Kept K/V groups are ordered by their number of kept query heads (largest first,
  ties in the original order) and their query heads follow them. When a layer's
  groups end up unequal, its entry in ``config.layer_shapes`` carries
  ``kv_groups`` (query heads per kept group) and the attention repeats K/V per
  query head (`jaxprune.models.layer` passes layer i's grouping as a static
  argument).
* Config: when every remaining layer has the same widths, both sublayers and
  equal groups, the result is a plain config (``num_attention_heads``,
  ``num_key_value_heads``, ``intermediate_size``/``ffn_dim``, ``hidden_size``
  updated, ``layer_shapes=None``) that `transformers` loads once saved, within
  its own limits: Llama needs ``hidden_size % num_attention_heads == 0``
  (transformers 5), OPT ``hidden_size == num_attention_heads * head_dim``.
  Otherwise ``layer_shapes`` lists each layer's widths (``n_heads=0`` /
  ``ffn_dim=0`` for absent sublayers) and the top-level widths keep the source's.

Exactness: compaction realises `effective_gates(params, gates)`, which is `gates`
with ``attn``/``mlp`` set to 0 where a sublayer lost every unit. That equals
`gates` itself except where a sublayer with every unit gated off still adds
something in the gated forward: its output bias (OPT; Llama with
``attention_bias``/``mlp_bias``) or, in post-LN OPT, its LayerNorm.

`param_count(params)` counts non-embedding parameters (every leaf but
``embed_tokens``, ``embed_positions`` and ``lm_head``). `compact` needs concrete
gates (not under `jit`); it slices on the host for CPU arrays, on device otherwise.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import models
    >>> from jaxprune.models.config import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> params = models.init(cfg, jax.random.key(0))
    >>> gates = {"heads": jnp.array([[0, 1, 0, 1], [1, 0, 0.5, 0]]),     # one head per K/V group left
    ...          "ffn": jnp.ones((2, 24)).at[:, :8].set(0.0)}
    >>> small = compact(params, gates)
    >>> c = small.config
    >>> c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.layer_shapes
    (2, 2, 16, None)
    >>> tokens = jnp.arange(8)[None]
    >>> float(jnp.abs(models.forward(small, tokens) - models.forward(params, tokens, gates)).max()) < 1e-5
    True
    >>> param_count(params), param_count(small)
    (3920, 2640)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import models
from jaxprune.models.config import freeze
from jaxprune.errors import InvalidArgumentError
from jaxprune.io.hf import validate_tree
from jaxprune.models import gates as gates_lib
from jaxprune.models.layout import layout_of
from jaxprune.core.params import Params

__all__ = ["compact", "effective_gates", "param_count"]

EMBEDDING_KEYS = ("embed_tokens", "embed_positions", "lm_head")

_UNIT_KEYS = {"heads": "n_heads", "kv_heads": "n_kv", "ffn": "ffn_dim"}
_SCALAR_KEYS = ("attn", "mlp", "layer")


def param_count(params) -> int:
    """Non-embedding parameters: every leaf except ``embed_tokens``, ``embed_positions``, ``lm_head``.

    Example:
        >>> import jax.numpy as jnp
        >>> param_count({"embed_tokens": {"embedding": jnp.ones((10, 4))}, "norm": {"scale": jnp.ones(4)}})
        4
    """
    tree = params.tree if isinstance(params, Params) else params
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for k, v in tree.items()
                   if k not in EMBEDDING_KEYS for x in jax.tree.leaves(v)))


# ---- gates: validated, as numpy, per layer ----

def _layer_dims(params: Params) -> list[dict]:
    cfg = params.config
    dims = [dict(models.family(cfg).layer_dims(cfg, lp)) for lp in params.tree["layers"]]
    for i, d in enumerate(dims):
        d.setdefault("n_kv", d["n_heads"])  # OPT: one K/V head per query head
        if models.kv_groups(cfg, i):
            d["kv_groups"] = models.kv_groups(cfg, i)
    return dims


def _concrete(label: str, v):
    if isinstance(v, jax.core.Tracer):
        raise InvalidArgumentError(f"compact needs concrete gate values (it cannot run under jit or vmap); "
                                   f"{label} is traced")
    a = np.asarray(v, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise InvalidArgumentError(f"{label} has non-finite values")
    return a


def _per_layer(key, v, dims: list[dict]) -> list:
    """Gate `key` as one numpy array per layer, shapes checked for the sublayers present."""
    L = len(dims)
    unit = _UNIT_KEYS.get(key)
    widths = sorted({d[unit] for d in dims if d[unit]}) if unit else []
    want = f"[{L}]" if unit is None else f"[{L}, {widths[0] if len(widths) == 1 else 'n_i'}]"
    if isinstance(v, (list, tuple)):
        if len(v) != L:
            raise InvalidArgumentError(f"gates[{key!r}] is a list of {len(v)} entries; the model has {L} layers")
        rows = [None if x is None else _concrete(f"gates[{key!r}][{i}]", x) for i, x in enumerate(v)]
        listed = True
    else:
        a = _concrete(f"gates[{key!r}]", v)
        if a.ndim != (1 if unit is None else 2) or a.shape[0] != L:
            extra = "" if len(widths) <= 1 else " (layers differ in width: pass a list of per-layer arrays)"
            raise InvalidArgumentError(f"gates[{key!r}] has shape {list(a.shape)}; this model needs {want}{extra}")
        rows, listed = list(a), False
    for i, (r, d) in enumerate(zip(rows, dims)):
        n = d[unit] if unit else None
        if unit and not n:
            continue  # that sublayer is absent: its gate is never read
        shape = () if unit is None else (n,)
        if r is None or r.shape != shape:
            got = None if r is None else list(r.shape)
            where = f"gates[{key!r}][{i}]" if listed else f"gates[{key!r}]"
            raise InvalidArgumentError(
                f"{where}: layer {i} needs {list(shape)} per layer ({unit or 'one scalar'}), got {got}"
                + ("" if listed else f"; the whole gate must be {want}"))
    return rows


def _hidden(gates, D: int):
    if gates.get("hidden") is None:
        return None
    h = _concrete("gates['hidden']", gates["hidden"])
    if h.shape != (D,):
        raise InvalidArgumentError(f"gates['hidden'] has shape {list(h.shape)}; this model needs [{D}]")
    if not np.all((h == 0) | (h == 1)):
        bad = h[(h != 0) & (h != 1)][0]
        raise InvalidArgumentError(f"gates['hidden'] must be binary (0 or 1), got {bad:g}: a scaled residual "
                                   "dimension cannot be folded into weights (the norms are not linear)")
    if not h.any():
        raise InvalidArgumentError("gates['hidden'] removes every hidden dimension")
    return np.flatnonzero(h)


# ---- the plan: which units each layer keeps and the multipliers folded into weights ----

def _plan(params: Params, gates) -> tuple[list[dict], np.ndarray | None]:
    gates = gates_lib.check_gates(gates)
    cfg = params.config
    dims = _layer_dims(params)
    g = {k: _per_layer(k, gates[k], dims) for k in gates_lib.PER_LAYER_KEYS if gates.get(k) is not None}
    hid = _hidden(gates, cfg.hidden_size)
    post_ln = getattr(cfg, "do_layer_norm_before", True) is False   # post-LN OPT
    plans = []
    for i, d in enumerate(dims):
        at = lambda k, default: g[k][i] if k in g else default
        lay = float(at("layer", 1.0))
        s_a, s_m = float(at("attn", 1.0)) * lay, float(at("mlp", 1.0)) * lay
        H, KV, F = d["n_heads"], d["n_kv"], d["ffn_dim"]
        heads, m, kept_groups, counts = np.zeros(0, int), np.ones(H, np.float32), [], np.zeros(KV, int)
        if H and s_a != 0:
            group_of = np.repeat(np.arange(KV), d.get("kv_groups") or (H // KV,) * KV)
            m = at("heads", m) * at("kv_heads", np.ones(KV, np.float32))[group_of]
            heads = np.flatnonzero(m)
            counts = np.bincount(group_of[heads], minlength=KV)
            kept_groups = [j for j in np.argsort(-counts, kind="stable") if counts[j]]
            heads = np.concatenate([heads[group_of[heads] == j] for j in kept_groups] or [heads])
        f = at("ffn", np.ones(F, np.float32)) if F and s_m != 0 else np.zeros(0, np.float32)
        channels = np.flatnonzero(f)
        for name, s, kept in (("attn", s_a, len(heads)), ("mlp", s_m, len(channels))):
            if post_ln and kept and s != 1:
                raise InvalidArgumentError(
                    f"layer {i}: post-LN OPT computes s * LN(x + f(x)) + (1 - s) * x, so its {name} gate "
                    f"(times the layer gate) must be 0 or 1 to compact, got {s:g}")
        new_groups = tuple(int(counts[j]) for j in kept_groups)
        plans.append(dict(
            dims=d, heads=heads, head_scale=m[heads], groups=np.asarray(kept_groups, int),
            kv_groups=new_groups if len(set(new_groups)) > 1 else None,
            channels=channels, channel_scale=f[channels],
            s_attn=1.0 if post_ln else s_a, s_mlp=1.0 if post_ln else s_m))
    return plans, hid


def effective_gates(params: Params, gates) -> dict:
    """The gates `compact(params, gates)` realises exactly: `gates` with ``attn`` / ``mlp`` set to 0
    where a sublayer lost every head / channel (see the module docstring for when this differs).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxprune import models
        >>> from jaxprune.models.config import OPTConfig
        >>> p = models.init(OPTConfig(vocab_size=16, hidden_size=8, ffn_dim=8, num_hidden_layers=2,
        ...                           num_attention_heads=2), jax.random.key(0))
        >>> effective_gates(p, {"heads": jnp.array([[0.0, 0.0], [1.0, 0.0]])})["attn"].tolist()
        [0.0, 1.0]
    """
    plans, _ = _plan(params, gates)
    out = dict(gates_lib.check_gates(gates))
    for name, units in (("attn", "heads"), ("mlp", "channels")):
        base = out.get(name)
        base = np.ones(len(plans), np.float32) if base is None else np.asarray(base, np.float32)
        out[name] = jnp.asarray(np.where([len(p[units]) == 0 for p in plans], 0.0, base))
    return out


# ---- slicing ----

def _idx(units: np.ndarray, n: int, width: int = 1):
    """Flat indices of `units` (each `width` wide) along an axis of n * width, or None for all of them."""
    if len(units) == n and np.array_equal(units, np.arange(n)):
        return None
    return (units[:, None] * width + np.arange(width)).ravel()


def _xp(a):
    """numpy for arrays in host memory (no per-shape compilation), jax.numpy on accelerators."""
    on_host = not hasattr(a, "devices") or all(d.platform == "cpu" for d in a.devices())
    return np if on_host else jnp


def _take(a, idx, axis: int):
    if idx is None:
        return a
    xp = _xp(a)
    return xp.take(xp.asarray(a), xp.asarray(idx), axis=axis)


def _scaled(a, factor):
    """a * factor in float32, cast back; factor broadcast along a's first axis."""
    factor = np.asarray(factor, np.float32)
    if np.all(factor == 1):
        return a
    f = factor.reshape(factor.shape + (1,) * (a.ndim - factor.ndim))
    xp = _xp(a)
    return (xp.asarray(a).astype(np.float32) * f).astype(a.dtype)


def _linear(p: dict, rows=None, cols=None, row_scale=None, scale: float = 1.0) -> dict:
    """A dense layer sliced to `rows` (inputs) / `cols` (outputs), rows scaled by `row_scale * scale`,
    bias by `scale`."""
    k = _take(_take(p["kernel"], rows, 0), cols, 1)
    out = {"kernel": _scaled(k, (1.0 if row_scale is None else np.asarray(row_scale, np.float32)) * np.float32(scale))}
    if "bias" in p:
        out["bias"] = _scaled(_take(p["bias"], cols, 0), scale)
    return out


def _vectors(node: dict, idx) -> dict:
    """Norm parameters (scale, bias) sliced to the kept hidden dims."""
    return jax.tree.map(lambda a: _take(a, idx, 0), node)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _put(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _fold_into_norm(node: dict, s: float, offset: float) -> dict:
    """A post-norm whose output is scaled by s: ``(offset + w) * s = offset + w'``."""
    if s == 1:
        return node
    out = dict(node)
    w = np.asarray(node["scale"], np.float32)
    out["scale"] = ((offset + w) * np.float32(s) - offset).astype(np.asarray(node["scale"]).dtype)
    if "bias" in node:
        out["bias"] = _scaled(node["bias"], s)
    return out


def _layer(cfg, lp: dict, plan: dict, hid) -> dict:
    """One layer sliced by its plan, reading which axis of every weight runs over which units
    from the family's layout."""
    lay = layout_of(cfg)
    Dh, d = cfg.head_dim, plan["dims"]
    idx = {"hidden": hid, "fixed": None}
    new = {}
    for kind in ("attn", "mlp"):
        if kind == "attn":
            if not len(plan["heads"]):
                continue
            idx["heads"] = _idx(plan["heads"], d["n_heads"], Dh)
            idx["groups"] = _idx(plan["groups"], d["n_kv"], Dh)
            unit_scale, s = np.repeat(plan["head_scale"], Dh), plan["s_attn"]
        else:
            if not len(plan["channels"]):
                continue
            idx["ffn"] = _idx(plan["channels"], d["ffn_dim"])
            unit_scale, s = plan["channel_scale"], plan["s_mlp"]
        post = lay.post_norm(kind)
        out_proj = lay.output_projection(kind)
        for lin in lay.linears_of(kind):
            rows, cols = (idx[r] for r in lin.roles)
            if lin is out_proj:   # unit gates scale its input rows; the sublayer gate its output
                sliced = _linear(_get(lp, lin.path), rows, cols, unit_scale, 1.0 if post else s)
            else:
                sliced = _linear(_get(lp, lin.path), rows, cols)
            _put(new, lin.path, sliced)
        for norm in lay.norms_of(kind):
            v = _vectors(_get(lp, norm.path), idx[norm.role])
            if norm is post:
                v = _fold_into_norm(v, s, lay.norm_offset)
            _put(new, norm.path, v)
    return new


def _widths(plan: dict, lay) -> dict:
    w = {"n_heads": len(plan["heads"]), "ffn_dim": len(plan["channels"])}
    if lay.config_widths.get("kv_heads"):
        w["n_kv"] = len(plan["groups"])
    if plan["kv_groups"] is not None:
        w["kv_groups"] = plan["kv_groups"]
    return w


def _config(cfg, widths: list[dict], kept_layers: list[int], D: int, P: int | None):
    lay = layout_of(cfg)
    Dh = cfg.head_dim
    fields = lay.config_widths
    uniform = all(w == widths[0] and w["n_heads"] and w["ffn_dim"] and "kv_groups" not in w for w in widths)
    kw = {"hidden_size": D, "num_hidden_layers": len(widths), "layer_shapes": None}
    if uniform and widths:
        w = widths[0]
        kw[fields["heads"]] = w["n_heads"]
        kw[fields["ffn"]] = w["ffn_dim"]
        if fields.get("kv_heads"):
            kw[fields["kv_heads"]] = w["n_kv"]
    elif widths:
        kw["layer_shapes"] = freeze(widths)
    for name in lay.per_layer_config:
        value = getattr(cfg, name)
        if value is not None:
            kw[name] = tuple(value[i] for i in kept_layers)
    if hasattr(cfg, "word_embed_proj_dim"):
        kw["word_embed_proj_dim"] = P
    # head_dim never changes: keep the config's derived value or pin it.
    try:
        derived = dataclasses.replace(cfg, **kw, head_dim_override=None).head_dim
    except InvalidArgumentError:
        derived = None
    kw["head_dim_override"] = None if derived == Dh else Dh
    return dataclasses.replace(cfg, **kw)


def _top(cfg, tree: dict, hid, D: int):
    """Everything outside the layers sliced to the kept hidden dims (layout roles), and the
    projection width of OPT-style project_in/project_out models."""
    lay = layout_of(cfg)
    projected = "project_in" in tree      # embeddings live in the projection space, not the hidden one
    if projected and D == cfg.word_embed_proj_dim:
        raise InvalidArgumentError(
            f"compacting hidden_size to {D} = word_embed_proj_dim would leave project_in/project_out "
            "that an OPT config cannot describe; keep one more or one fewer hidden dim")
    out = {}
    for key, node in tree.items():
        if key == "layers":
            continue
        if projected and key == "embed_tokens":
            out[key] = node
            continue

        def slice_leaf(kp, a, key=key):
            roles = lay.top_roles((key,) + tuple(getattr(k, "key", None) for k in kp))
            for axis, role in enumerate(roles):
                if role == "hidden":
                    a = _take(a, hid, axis)
            return a

        out[key] = jax.tree_util.tree_map_with_path(slice_leaf, node)
    P = cfg.word_embed_proj_dim if projected else D
    return out, P


def compact(params: Params, gates) -> Params:
    """Slice the units `gates` remove out of `params`: a smaller dense model, same logits.

    Args:
      params: a Llama or OPT `Params` (uniform or already compacted).
      gates: a gates dict (`jaxprune.models.gates`) with concrete values; per-layer
        entries are ``[L, n]`` arrays or lists of per-layer arrays.

    Returns:
      `Params` with a config describing the new widths (see the module docstring for
      the rules), whose `forward` equals `forward(params, tokens, effective_gates(params, gates))`.

    Raises:
      InvalidArgumentError: unknown keys, wrong shapes, traced or non-finite values, a
        non-binary ``hidden`` gate, non-binary sublayer gates in post-LN OPT.
    """
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"compact needs jaxprune Params, got {type(params).__name__}")
    models.require_layer_list(params, "compact")
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
        raise InvalidArgumentError("compact needs concrete params: it cannot run under jit or vmap")
    cfg, tree = params.config, params.tree
    lay = layout_of(cfg)
    plans, hid = _plan(params, gates)
    D = cfg.hidden_size if hid is None else len(hid)
    layers, widths, kept = [], [], []
    for i, (lp, plan) in enumerate(zip(tree["layers"], plans)):
        new = _layer(cfg, lp, plan, hid)
        if new:
            layers.append(new)
            widths.append(_widths(plan, lay))
            kept.append(i)
    out, P = _top(cfg, tree, hid, D)
    out["layers"] = layers
    out = jax.tree.map(jnp.asarray, out)
    new_cfg = _config(cfg, widths, kept, D, P)
    validate_tree(new_cfg, out, "compact")  # internal consistency: the new config implies these shapes
    return Params(new_cfg, out)
