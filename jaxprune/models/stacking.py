"""Stacked layers: a uniform model's layers as one dict of arrays with a leading layer axis.

`stack_layers(params)` turns ``tree["layers"]`` from a list of per-layer dicts into one dict
of the same structure whose arrays are ``[L, ...]``; `jaxprune.models.forward` (and `logits`,
`hidden_states`, so perplexity and Bonsai's utilities too) sees the dict and runs the layers
under `jax.lax.scan`: one compiled layer body, so compile time does not grow with depth.
Layers whose types differ (Gemma's sliding / global alternation) run a `jax.lax.switch` over
the distinct types inside the scanned body. Per-layer gates already carry a leading layer
axis and are scanned along with the weights.

Only models whose layers all have the same sublayers, shapes, dtypes and K/V grouping can be
stacked; compacted non-uniform models keep the per-layer loop (`stack_layers` rejects them
with `InvalidArgumentError`). Other entry points (pruning, generation, saving) take the list
form: `unstack_layers` gives it back.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune import models
    >>> from jaxprune.models.config import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    >>> params = models.init(cfg, jax.random.key(0))
    >>> stacked = stack_layers(params)
    >>> stacked["layers"]["mlp"]["up_proj"]["kernel"].shape
    (3, 32, 64)
    >>> tokens = jnp.zeros((1, 8), jnp.int32)
    >>> bool(jnp.allclose(models.forward(stacked, tokens), models.forward(params, tokens), atol=1e-5))
    True
    >>> len(unstack_layers(stacked)["layers"])
    3
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.params import Params
from jaxprune.errors import InvalidArgumentError
from jaxprune.models.gates import PER_LAYER_KEYS


def is_stacked(params: Params) -> bool:
    """True when ``params.tree["layers"]`` is one stacked dict (not a list of layers)."""
    return isinstance(params.tree.get("layers"), dict)


def require_layer_list(params, what: str) -> None:
    """Raise `InvalidArgumentError` when `params` has stacked layers, which `what` does not take."""
    if isinstance(params, Params) and is_stacked(params):
        raise InvalidArgumentError(f"{what} takes params with a list of layers, got stacked layers: "
                                   "call jaxprune.models.unstack_layers(params) first")


def num_layers(params: Params) -> int:
    """Number of decoder layers, stacked or not."""
    layers = params.tree["layers"]
    if isinstance(layers, dict):
        return int(np.shape(jax.tree.leaves(layers)[0])[0])
    return len(layers)


def layer_tree(params: Params, i: int) -> dict:
    """Layer i's params dict, from either form."""
    layers = params.tree["layers"]
    return jax.tree.map(lambda a: a[i], layers) if isinstance(layers, dict) else layers[i]


def _describe(lp) -> dict:
    return {jax.tree_util.keystr(p): (tuple(np.shape(a)), np.dtype(a.dtype))
            for p, a in jax.tree_util.tree_flatten_with_path(lp)[0]}


def check_uniform(params: Params) -> None:
    """Raise `InvalidArgumentError` unless every layer has layer 0's sublayers, shapes, dtypes
    and K/V grouping (the condition for stacking)."""
    layers = params.tree.get("layers")
    if not isinstance(layers, (list, tuple)) or not layers:
        raise InvalidArgumentError("stack_layers needs params with a non-empty list of layers")
    cfg = params.config
    first = _describe(layers[0])
    groups0 = cfg.kv_groups_of(0) if hasattr(cfg, "kv_groups_of") else None
    for i, lp in enumerate(layers[1:], start=1):
        d = _describe(lp)
        if d != first:
            lost, extra = sorted(set(layers[0]) - set(lp)), sorted(set(lp) - set(layers[0]))
            if lost or extra:
                what = (f"it lacks {', '.join(lost)}" if lost else f"it has {', '.join(extra)}, which layer 0 lacks")
            elif set(first) != set(d):
                what = f"its parameters are {sorted(d)}, layer 0's are {sorted(first)}"
            else:
                k = next(k for k in first if first[k] != d[k])
                what = f"{k} is {d[k]}, layer 0's is {first[k]}"
            raise InvalidArgumentError(
                f"stack_layers needs a uniform model, but layer {i} differs from layer 0: {what}; "
                "compacted non-uniform models run the per-layer loop: keep them unstacked")
        if hasattr(cfg, "kv_groups_of") and cfg.kv_groups_of(i) != groups0:
            raise InvalidArgumentError(
                f"stack_layers needs a uniform model, but layer {i}'s K/V groups {cfg.kv_groups_of(i)} differ "
                f"from layer 0's {groups0}; keep this compacted model unstacked")


def stack_layers(params: Params) -> Params:
    """The same model with ``tree["layers"]`` one dict of ``[L, ...]`` arrays (see the module
    docstring). Already stacked params are returned as they are. Works under `jax.eval_shape`
    (abstract weights)."""
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"stack_layers needs jaxprune Params, got {type(params).__name__}")
    if is_stacked(params):
        return params
    check_uniform(params)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params.tree["layers"])
    return params.replace(tree={**params.tree, "layers": stacked})


def unstack_layers(params: Params) -> Params:
    """The list-of-layers form of stacked params (unstacked params are returned as they are)."""
    if not is_stacked(params):
        return params
    layers = [layer_tree(params, i) for i in range(num_layers(params))]
    return params.replace(tree={**params.tree, "layers": layers})


def scan_layers(layers: dict, x, gates: dict | None, types: list, apply):
    """Run stacked `layers` over hidden states x under `jax.lax.scan`.

    types: each layer's static type (None for families without types); apply(lp, x, g,
    layer_type) runs one layer with its gates g (per-layer entries sliced, ``hidden`` as is).
    """
    gates = gates or {}
    per_layer = {k: jnp.stack(list(gates[k])) if isinstance(gates[k], (list, tuple)) else gates[k]
                 for k in PER_LAYER_KEYS if gates.get(k) is not None}
    hidden = gates.get("hidden")
    kinds = list(dict.fromkeys(types))
    index = jnp.asarray([kinds.index(t) for t in types], jnp.int32)

    def body(h, xs):
        lp, g, k = xs
        if hidden is not None:
            g = {**g, "hidden": hidden}
        branches = [lambda h, t=t: apply(lp, h, g, t) for t in kinds]
        h = branches[0](h) if len(branches) == 1 else jax.lax.switch(k, branches, h)
        return h, None

    x, _ = jax.lax.scan(body, x, (layers, per_layer, index))
    return x
