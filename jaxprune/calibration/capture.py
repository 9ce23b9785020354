"""Linear-layer input statistics (the driver that uses them is `jaxprune.calibration.driver`).

Inputs of linear layers are captured with `flax.linen.intercept_methods` on
`nn.Dense`/`nn.DenseGeneral`, the same mechanism for jaxprune's models and for a
user's own linen model: no second model definition. Statistics are sums over
tokens (float32), so they add across batches and devices (`psum`):

* ``"sumsq"``: sum_t x_t^2 per input feature (Wanda),
* ``"hessian"``: sum_t x_t x_t^T (SparseGPT).

Example (statistics of every linear layer of a model, in one jitted forward):
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> stats = input_stats(params, jnp.zeros((2, 8), jnp.int32), "sumsq")
    >>> stats["sums"]["['layers'][0]['mlp']['down_proj']['kernel']"].shape, int(stats["count"])
    ((64,), 16)
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxprune import models
from jaxprune.errors import InvalidArgumentError
from jaxprune.core.params import Params
from jaxprune.sparsity.sparsegpt import gram

STAT_KINDS = ("sumsq", "hessian")
MODES = ("sequential", "as-you-go", "dense")


def plain_path(keypath) -> tuple:
    """A jax key path as a plain tuple of str/int: ('layers', 0, 'mlp', 'up_proj', 'kernel')."""
    out = []
    for k in keypath:
        out.append(k.key if hasattr(k, "key") else k.idx if hasattr(k, "idx") else getattr(k, "name", str(k)))
    return tuple(out)


def path_key(path: tuple) -> str:
    """The `jax.tree_util.keystr` spelling of a plain path (keys of statistics dicts)."""
    return "".join(f"[{p!r}]" for p in path)


def input_stat(kind: str, x):
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if kind == "sumsq":
        return jnp.sum(x * x, axis=0)
    if kind == "hessian":
        return gram(x)   # x^T x, the upper blocks only
    raise InvalidArgumentError(f"statistics kind must be one of {STAT_KINDS}, got {kind!r}")


def _dense_interceptor(on_dense):
    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.DenseGeneral)):
            return on_dense(tuple(m.path), m, args[0], lambda: next_fun(*args, **kwargs))
        return next_fun(*args, **kwargs)
    return interceptor


BLOCK_BYTES = 1 << 25


def blocked_matmuls(fn: Callable, max_block_bytes: int | None = None):
    """Run `fn()` (op by op, not under jit) with every `nn.Dense` computed in blocks of output
    columns of at most `max_block_bytes` (default `BLOCK_BYTES`, 32 MiB) of converted weights,
    each block converted to the activations' dtype on its own: a bfloat16 matrix is never upcast
    whole (XLA on CPU computes bfloat16 matmuls in float32). Installed innermost, under any
    interceptor that must see the inputs (it does not call the next one for blocked layers)."""
    max_block_bytes = BLOCK_BYTES if max_block_bytes is None else max_block_bytes

    def on_dense(path, module, x, call):
        p = module.variables["params"]
        kernel = p["kernel"]
        per_col = kernel.shape[0] * jnp.dtype(x.dtype).itemsize
        bs = max(1, max_block_bytes // per_col)
        if bs >= kernel.shape[1]:
            return call()
        y = jnp.concatenate([jnp.dot(x, kernel[:, s:s + bs].astype(x.dtype))
                             for s in range(0, kernel.shape[1], bs)], axis=-1)
        return y + p["bias"].astype(y.dtype) if "bias" in p else y

    with nn.intercept_methods(_dense_interceptor(on_dense)):
        return fn()


def capture(fn: Callable, kind: str, paths=None):
    """Run `fn()` (which applies linen modules), recording `input_stat(kind, x)` of the input
    of every `nn.Dense`/`nn.DenseGeneral` call (module path -> stat). Layers that share one
    input (q/k/v, gate/up) share one statistic computation. Returns (fn(), stats)."""
    stats, seen = {}, {}

    def on_dense(path, module, x, call):
        if paths is None or path in paths:
            if id(x) not in seen:
                seen[id(x)] = (x, input_stat(kind, x))  # keep x alive so its id stays unique
            stats[path] = seen[id(x)][1]
        return call()

    with nn.intercept_methods(_dense_interceptor(on_dense)):
        out = fn()
    return out, stats


def input_groups(fn: Callable) -> tuple[tuple, ...]:
    """Module paths of the `nn.Dense`/`nn.DenseGeneral` layers `fn()` applies, grouped by the input
    they share (q/k/v, gate/up), in call order. Trace it abstractly (`jax.eval_shape`): only the
    structure matters."""
    groups = {}

    def on_dense(path, module, x, call):
        groups.setdefault(id(x), (x, []))[1].append(path)   # x kept alive so its id stays unique
        return call()

    with nn.intercept_methods(_dense_interceptor(on_dense)):
        fn()
    return tuple(tuple(paths) for _, paths in groups.values())


def input_stats(params: Params, tokens, kind: str = "sumsq") -> dict:
    """Statistics of every linear layer's input in the blocks of the dense model (pure, jit-able).

    Returns {"sums": {keystr(path of kernel): stat}, "count": number of tokens}. Add results of
    several batches (or `psum` across devices) before passing them to `wanda`/`sparsegpt`.
    """
    x, ctx = models.embed(params, tokens)
    sums = {}
    for i in range(len(params.tree["layers"])):
        x, st = capture(lambda: models.layer(params, i, x, ctx), kind)
        for path, s in st.items():
            sums[path_key(("layers", i) + path + ("kernel",))] = s
    return {"sums": sums, "count": jnp.asarray(tokens.size, jnp.float32)}
