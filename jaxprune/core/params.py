"""`Params`: a params pytree that knows its architecture.

`Params` is a read-only mapping over a nested dict of arrays plus a config held
as static pytree metadata. `jax.tree.map`, `jit`, sharding and orbax see only the
arrays; `params.config` tells every function which model the arrays describe. A
mask pytree produced by `jax.tree.map(f, params)` is again a `Params` with the
same config, so masks are "shaped like params" by construction.

Layout (dense kernels are `[in, out]`; HF's `[out, in]` is transposed on load)::

    llama: embed_tokens/embedding [V, D]
           layers[i]/input_layernorm/scale [D]
           layers[i]/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel (+bias)
           layers[i]/post_attention_layernorm/scale [D]
           layers[i]/mlp/{gate_proj,up_proj,down_proj}/kernel
           norm/scale [D]; lm_head/kernel [D, V] unless tied
    opt:   embed_tokens/embedding [V, P]; embed_positions/embedding [max_pos + 2, D]
           project_in/kernel [P, D], project_out/kernel [D, P] when P != D
           layers[i]/self_attn_layer_norm/{scale,bias}
           layers[i]/self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel,bias}
           layers[i]/final_layer_norm/{scale,bias}; layers[i]/{fc1,fc2}/{kernel,bias}
           final_layer_norm/{scale,bias} (pre-LN only)

A layer whose `self_attn` (or `mlp`/`fc1`) entry is absent has had that sublayer
removed by compaction and acts as the identity there.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.models.config import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...                   num_hidden_layers=1, num_attention_heads=2)
    >>> p = Params(cfg, {"norm": {"scale": jnp.ones(4)}})
    >>> jax.tree.map(lambda x: x * 2, p).config is cfg
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # a config is any frozen family config; core does not import models
    from jaxprune.models.config import ModelConfig


@jax.tree_util.register_pytree_with_keys_class
class Params(Mapping):
    """Nested dict of arrays with the model config as static metadata."""

    __slots__ = ("config", "tree")

    def __init__(self, config: ModelConfig, tree: dict[str, Any]):
        self.config = config
        self.tree = dict(tree)

    def __getitem__(self, key):
        return self.tree[key]

    def __iter__(self):
        return iter(self.tree)

    def __len__(self):
        return len(self.tree)

    def __repr__(self):
        n = sum(getattr(x, "size", 0) for x in jax.tree.leaves(self.tree))
        return f"Params({self.config.arch}, {self.config.num_hidden_layers} layers, {n:,} values)"

    def replace(self, tree: dict[str, Any] | None = None, config: ModelConfig | None = None) -> "Params":
        """A new `Params` with another tree and/or config."""
        return Params(config if config is not None else self.config, self.tree if tree is None else tree)

    def tree_flatten_with_keys(self):
        keys = sorted(self.tree)
        return [(jax.tree_util.DictKey(k), self.tree[k]) for k in keys], (self.config, tuple(keys))

    @classmethod
    def tree_unflatten(cls, aux, children):
        config, keys = aux
        return cls(config, dict(zip(keys, children)))


def get_path(tree, path: tuple):
    """`tree[p0][p1]...` for a plain path."""
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple, value) -> dict:
    """A copy of nested dict `tree` with `value` at `path` (copy-on-write; input untouched)."""
    if not path:
        return value
    return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}
