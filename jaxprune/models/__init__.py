"""Model families behind one pure functional face.

`forward(params, tokens, gates=None)` is the whole model; `embed`, `layer` and
`unembed` are its three stages, so sequential calibration can run one layer at a
time and streaming can hold one layer in memory.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.models.config import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = init(cfg, jax.random.key(0))
    >>> forward(params, jnp.zeros((1, 8), jnp.int32)).shape
    (1, 8, 64)
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from jaxprune.errors import InvalidArgumentError
from jaxprune.core.params import Params
from jaxprune.models import gates as gates_lib
from jaxprune.models import gemma, llama, mistral, opt, qwen
from jaxprune.models.stacking import (is_stacked, layer_tree, num_layers, require_layer_list, scan_layers,
                                      stack_layers, unstack_layers)
from jaxprune.models.layout import Layout, Linear, Norm, layout_of

# arch -> module with embed, layer, unembed, shapes, per_layer_dims, layer_dims
FAMILIES = {"llama": llama, "opt": opt, "gemma2": gemma, "gemma3": gemma, "qwen2": qwen, "qwen3": qwen,
            "mistral": mistral}


def family(config):
    return FAMILIES[config.arch]


def shapes(config) -> dict:
    """Tree of parameter shapes (tuples) that `config` implies."""
    return family(config).shapes(config)


def is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def init(config, key, dtype=jnp.float32) -> Params:
    """Random params for `config`: for tests, examples and benchmarks.

    Kernels, embeddings and biases ~ N(0, 0.02); norms multiply by ~ 1 + N(0, 0.02) (so a
    family whose norms multiply by ``1 + w`` (Gemma) gets w ~ N(0, 0.02)).
    """
    offset = layout_of(config).norm_offset
    paths_shapes = jax.tree_util.tree_flatten_with_path(shapes(config), is_leaf=is_shape)
    leaves, treedef = paths_shapes
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, (path, shape) in zip(keys, leaves):
        v = 0.02 * jax.random.normal(k, shape, jnp.float32)
        if path[-1].key == "scale":
            v = 1.0 - offset + v
        out.append(v.astype(dtype))
    return Params(config, jax.tree.unflatten(treedef, out))


def embed(params: Params, tokens, gates=None, positions=None):
    """tokens [B, T] -> (hidden states [B, T, D], per-forward context for `layer`).

    positions: int [B, T] position of each token (decoding with a KV cache); default ``arange(T)``.
    """
    kw = {} if positions is None else {"positions": positions}
    return family(params.config).embed(params.config, params.tree, tokens, gates or {}, **kw)


def layer(params: Params, i: int, x, ctx, gates=None, cache=None):
    """Apply decoder layer `i` to hidden states x [B, T, D].

    With a KV `cache` for this layer (`jaxprune.generation.kv_cache`) returns (x, new cache);
    a layer without attention returns its cache (None) unchanged.
    """
    cfg = params.config
    kw = {} if layer_type(cfg, i) is None else {"layer_type": layer_type(cfg, i)}
    if cache is not None:
        kw["cache"] = cache
    return family(cfg).layer(cfg, layer_tree(params, i), x, ctx, gates_lib.layer_gates(gates, i),
                             kv_groups(cfg, i), **kw)


def kv_groups(config, i: int):
    """Layer i's unequal K/V grouping (static: query heads per K/V head), or None."""
    return config.kv_groups_of(i) if hasattr(config, "kv_groups_of") else None


def layer_type(config, i: int):
    """Layer i's type (static: ``"full_attention"`` or ``"sliding_attention"``), or None for
    families without layer types (OPT). Llama-like families' `layer` takes it as `layer_type=`;
    it must be passed where a model mixes types (Gemma 2/3)."""
    return config.layer_type(i) if hasattr(config, "layer_type") else None


def unembed(params: Params, x, gates=None):
    """Final norm (and projection) and LM head: [B, T, D] -> float32 logits [B, T, V]."""
    return family(params.config).unembed(params.config, params.tree, x, gates or {})


def hidden_states(params: Params, tokens, gates=None):
    """The residual stream after the last layer, before the final norm.

    Stacked layers (`stack_layers`) run under `jax.lax.scan`; a list of layers runs as a Python loop.
    """
    x, ctx = embed(params, tokens, gates)
    if is_stacked(params):
        cfg, fam = params.config, family(params.config)
        kg = kv_groups(cfg, 0)   # stack_layers checked that every layer has the same

        def apply(lp, h, g, kind):
            return fam.layer(cfg, lp, h, ctx, g, kg, **({} if kind is None else {"layer_type": kind}))

        types = [layer_type(cfg, i) for i in range(num_layers(params))]
        return scan_layers(params.tree["layers"], x, gates, types, apply)
    for i in range(len(params.tree["layers"])):
        x = layer(params, i, x, ctx, gates)
    return x


def logits(params: Params, tokens, gates=None):
    """The forward with no input checks, for use inside your own `jit` (`forward` checks, then runs this)."""
    return unembed(params, hidden_states(params, tokens, gates), gates)


_forward_jit = jax.jit(logits)


def forward(params: Params, tokens, gates=None):
    """Logits of the model: tokens int32 [B, T] -> float32 logits [B, T, V].

    Pure and jit-compiled; `gates` (see `jaxprune.models.gates`) switch heads,
    K/V groups, FFN channels, hidden dims, sublayers or layers off, defaulting to
    keeping everything. `jax.vmap(lambda g: forward(params, tokens, g))(batched_gates)`
    evaluates many sub-models at once. Inside your own `jit`, it is traced inline. Params whose
    layers are stacked (`stack_layers`) run under `jax.lax.scan`: one compilation for any depth.

    Example:
        >>> import jaxprune as jp, jax.numpy as jnp
        >>> params = jp.load("smollm2-135m")                        # doctest: +SKIP
        >>> jp.forward(params, jnp.array([[1, 2, 3]])).shape        # doctest: +SKIP
        (1, 3, 49152)
    """
    if not isinstance(params, Params):
        raise InvalidArgumentError(
            f"forward needs jaxprune Params (from jaxprune.load or jaxprune.models.init), got {type(params).__name__}")
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise InvalidArgumentError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    gates_lib.check_gates(gates)
    return _forward_jit(params, tokens, gates)
