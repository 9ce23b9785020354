"""Pruning a user's own Flax model: a linen `params` dict or an `nnx.State`.

The inputs of every dense layer are captured during one calibration pass of the
unpruned model (dense one-pass statistics): with `flax.linen.intercept_methods`
on `nn.Dense`/`nn.DenseGeneral` for linen, and for NNX by tracing `apply_fn` to a
jaxpr and noting the input of every `x @ kernel` against a kernel of the state
(an `nnx.Linear` is matched to its state entry by the kernel it multiplies; no
class is patched, so other models and threads are unaffected).
`jaxprune.wanda/magnitude/sparsegpt` dispatch here when `params` is not jaxprune
`Params`.

Kernels are `[in, out]` (Flax's layout); a DenseGeneral kernel `[in, *features]`
is treated as `[in, prod(features)]`.

Example (linen):
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxprune as jp
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> masks = jp.wanda(params, x, sparsity=0.5, apply_fn=lambda p, b: model.apply({"params": p}, b))
    >>> float(masks["layers_0"]["kernel"].mean())
    0.5
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxprune.sparsity import criteria
from jaxprune.calibration.capture import _dense_interceptor, input_stat, plain_path
from jaxprune.errors import InvalidArgumentError
from jaxprune.core.checks import is_real_dtype
from jaxprune.sparsity.masks import group_size, n_pruned, select_count
from jaxprune.sparsity.sparsegpt import block_counts, solve


def _strip(path: tuple) -> tuple:
    return path[:-1] if path and path[-1] == "value" else path


def user_default_prunable(path: tuple) -> bool:
    """Every leaf named `kernel` (2-D or DenseGeneral)."""
    return bool(path) and path[-1] == "kernel"


# Primitives whose sub-jaxpr takes the equation's inputs one for one: a kernel passed into them
# (e.g. under an inner `jax.jit`/`nnx.jit` or `nnx.remat`) is followed inside.
_CALL_PRIMITIVES = {"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr"}


def _sub_jaxpr(eqn):
    """(jaxpr, consts) of a call-like equation whose sub-jaxpr takes its inputs one for one, else None."""
    if eqn.primitive.name not in _CALL_PRIMITIVES:
        return None
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(name)
        if isinstance(sub, jex_core.ClosedJaxpr):
            sub, consts = sub.jaxpr, sub.consts
        elif isinstance(sub, jex_core.Jaxpr):
            consts = ()
        else:
            continue
        if len(sub.invars) == len(eqn.invars):
            return sub, consts
    return None


def _eval_recording(jaxpr, consts, args, kernels: dict, on_matmul):
    """Evaluate `jaxpr` (in the current trace) like `jax.core.eval_jaxpr`, calling
    ``on_matmul(kernel_id, x)`` for every ``x @ kernel`` (a `dot_general` contracting the last axis
    of x with axis 0 of a kernel, possibly dtype-converted first) whose kernel variable is in
    `kernels` ({jaxpr variable: kernel id})."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        tracked = [kernels.get(v) if not isinstance(v, jex_core.Literal) else None for v in eqn.invars]
        name = eqn.primitive.name
        sub = _sub_jaxpr(eqn) if any(t is not None for t in tracked) else None
        if name == "dot_general" and tracked[1] is not None:
            (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
            if tuple(lhs_c) == (np.ndim(invals[0]) - 1,) and tuple(rhs_c) == (0,) and not lhs_b and not rhs_b:
                on_matmul(tracked[1], invals[0])
        if sub is not None:
            inner = {v: t for v, t in zip(sub[0].invars, tracked) if t is not None}
            outs = _eval_recording(sub[0], sub[1], invals, inner, on_matmul)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        if name == "convert_element_type" and tracked[0] is not None:
            kernels = {**kernels, eqn.outvars[0]: tracked[0]}     # a kernel promoted to the compute dtype
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jex_core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _matmul_inputs(params, batch, apply_fn: Callable, wanted: dict, record) -> None:
    """``record(path, x)`` for the input x of every matmul of `apply_fn(params, batch)` against a
    leaf of `params` in `wanted` ({leaf index in `jax.tree.leaves(params)`: path}).

    `apply_fn` is traced to a jaxpr whose inputs are the leaves of `params`, which is then
    evaluated in the caller's trace, noting each `x @ kernel`: no module class is patched, so
    other models and threads are unaffected, and an `nnx.Linear` is found by its kernel whatever
    graph `apply_fn` merges."""
    closed = jax.make_jaxpr(lambda p, b: (apply_fn(p, b), None)[1])(params, batch)
    n = len(jax.tree.leaves(params))
    kernels = {v: i for i, v in enumerate(closed.jaxpr.invars[:n]) if i in wanted}
    args = jax.tree.leaves(params) + jax.tree.leaves(batch)
    _eval_recording(closed.jaxpr, closed.consts, args, kernels, lambda i, x: record(wanted[i], x))


def collect(params, batch, apply_fn: Callable, kind: str) -> dict:
    """{plain kernel path: summed input statistic} over one batch (pure; jit-able).

    Linen `nn.Dense`/`nn.DenseGeneral` inputs are captured with `flax.linen.intercept_methods`
    (linen params); kernels that no linen layer reached (`nnx.Linear` layers of an `nnx.State`)
    are found in the traced computation as `x @ kernel` (see `_matmul_inputs`): the statistic
    is then of x as the matmul sees it (after any dtype promotion of the layer)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [_strip(plain_path(kp)) for kp, _ in leaves]
    stats: dict = {}
    cache: dict = {}

    def record(path, x):
        if id(x) not in cache:
            cache[id(x)] = (x, input_stat(kind, x))
        stats[path] = cache[id(x)][1]

    def on_dense(mpath, module, x, call):
        record(tuple(mpath) + ("kernel",), x)
        return call()

    if type(params).__name__ != "State":            # linen params (an nnx.State holds no linen layers)
        with nn.intercept_methods(_dense_interceptor(on_dense)):
            apply_fn(params, batch)
    wanted = {i: path for i, (path, (_, leaf)) in enumerate(zip(paths, leaves))
              if np.ndim(leaf) >= 2 and path and path[-1] == "kernel" and path not in stats}
    if wanted:
        _matmul_inputs(params, batch, apply_fn, wanted, record)
    return stats


_collect_jit = jax.jit(collect, static_argnames=("apply_fn", "kind"))   # one program per apply_fn and shapes
_select_jit = jax.jit(select_count, static_argnames=("nm", "scope"))     # the prune count traced


def _batches(calib):
    if isinstance(calib, (list, tuple)):
        return list(calib)
    return [calib]


def prune_user_model(params, calib, method: str, sparsity: float, nm, scope: str, apply_fn, prunable,
                     blocksize: int = 128, percdamp: float = 0.01):
    """Masks (and for SparseGPT new params) for a user's params pytree. See module docstring."""
    prunable = prunable or user_default_prunable
    kernels = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _strip(plain_path(kp))
        if prunable(path) and np.ndim(leaf) >= 2:
            if not is_real_dtype(getattr(leaf, "dtype", None)):
                raise InvalidArgumentError(f"{path} must be an array of real numbers, got {type(leaf).__name__} "
                                           f"{getattr(leaf, 'dtype', '')}")
            if not bool(jnp.isfinite(leaf).all()):
                raise InvalidArgumentError(f"{path} holds NaN or Inf weights")
            kernels[path] = leaf
    if not kernels:
        raise InvalidArgumentError("the prunable predicate selects no kernel of at least 2 dimensions")
    stats, count = {}, 0.0
    if method != "magnitude":
        if apply_fn is None:
            raise InvalidArgumentError(f"{method} on your own Flax model needs apply_fn(params, batch) "
                                       "to run calibration")
        kind = "sumsq" if method == "wanda" else "hessian"
        for b in _batches(calib):
            st = _collect_jit(params, b, apply_fn=apply_fn, kind=kind)
            stats = st if not stats else jax.tree.map(jnp.add, stats, st)
            leading = np.shape(b)[:-1]
            count += float(np.prod(leading)) if leading else 1.0
        missing = [p for p in kernels if p not in stats]
        if missing:
            raise InvalidArgumentError(f"no calibration input reached {missing[:3]}: they are not nn.Dense/"
                                       "nn.DenseGeneral/nnx.Linear layers called by apply_fn; exclude them "
                                       "with `prunable`")
    new_kernels, keeps = {}, {}
    for path, k in kernels.items():
        k2 = k.reshape(k.shape[0], int(np.prod(k.shape[1:])))   # [in, out...] -> [in, out]; sizes may be 0
        if method == "sparsegpt":
            kf, kl = block_counts(k2.shape[1], k2.shape[0], sparsity, blocksize)
            new, keep = solve(k2, 2.0 * stats[path] / count, kf, kl, nm=nm, blocksize=blocksize, percdamp=percdamp)
        else:
            scores = criteria.magnitude(k2) if method == "magnitude" else criteria.wanda(k2, stats[path] / count)
            keep = _select_jit(scores, n_pruned(group_size(k2.shape, scope), sparsity), nm=nm, scope=scope)
            new = jnp.where(keep, k2, 0)
        keeps[path] = keep.reshape(k.shape)
        new_kernels[path] = new.reshape(k.shape).astype(k.dtype)

    def mask_leaf(kp, leaf):
        return keeps.get(_strip(plain_path(kp)), jnp.ones(jnp.shape(leaf), bool))

    def param_leaf(kp, leaf):
        return new_kernels.get(_strip(plain_path(kp)), leaf)

    masks = jax.tree_util.tree_map_with_path(mask_leaf, params)
    if method == "sparsegpt":
        return jax.tree_util.tree_map_with_path(param_leaf, params), masks
    return masks
