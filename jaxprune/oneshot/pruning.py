"""One-shot pruning: `magnitude`, `wanda`, `sparsegpt` on jaxprune `Params`.

Each returns a mask pytree shaped like the params (SparseGPT also returns updated
weights). The prunable set is every linear layer inside the transformer blocks
unless `prunable(path)` says otherwise (`path` is a plain tuple such as
`('layers', 3, 'mlp', 'up_proj', 'kernel')`).

Example:
    >>> import jaxprune as jp
    >>> params, tok = jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m")          # doctest: +SKIP
    >>> calib = jp.calibration_windows(tok, [jp.bundled_text("emma")], n=32, seqlen=512)  # doctest: +SKIP
    >>> masks = jp.wanda(params, calib, sparsity=0.5)                                  # doctest: +SKIP
    >>> pruned = jp.apply_masks(params, masks)                                         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.sparsity import criteria
from jaxprune.calibration.capture import path_key, plain_path
from jaxprune.calibration.driver import default_batch_size, prune_counts, prune_layer, run_layerwise
from jaxprune.core.checks import check_tokens
from jaxprune.errors import DataError, InvalidArgumentError, check_int
from jaxprune.sparsity.masks import (TORCH_TIES_MAX_M, check_sparsity, full_masks, global_masks, group_size, host_view, keep_top_host, n_pruned,
                                     nm_keep_host, on_host, parse_pattern, select_count)
from jaxprune.core.params import Params, get_path, set_path
from jaxprune.models.stacking import require_layer_list
from jaxprune.sparsity.sparsegpt import block_counts, solve, solve_group

SCOPES = ("row", "layer", "global")


def default_prunable(path: tuple) -> bool:
    """Every dense kernel inside the transformer blocks (not embeddings, not the LM head)."""
    return len(path) > 2 and path[0] == "layers" and path[-1] == "kernel"


def kernel_paths(params: Params, prunable=None) -> list[tuple]:
    """Plain paths of the 2-D leaves of `params` that `prunable(path)` selects (default:
    `default_prunable`), in tree order."""
    prunable = prunable or default_prunable
    return [plain_path(k) for k, x in jax.tree_util.tree_flatten_with_path(params.tree)[0]
            if np.ndim(x) == 2 and prunable(plain_path(k))]


def _is_user_params(params) -> bool:
    """A user's own Flax params (linen dict / nnx.State), not jaxprune Params."""
    if isinstance(params, Params):
        return False
    if isinstance(params, dict) or type(params).__name__ == "State":
        return True
    raise InvalidArgumentError(f"expected jaxprune Params (from jaxprune.load), a linen params dict or an "
                               f"nnx.State; got {type(params).__name__}")


def _user(params, calib, method, sparsity, pattern, scope, apply_fn, prunable, **kw):
    from jaxprune.calibration.flax_models import prune_user_model
    sparsity = check_sparsity(sparsity)
    if not isinstance(scope, str) or scope not in ("row", "layer"):
        raise InvalidArgumentError(f"scope must be 'row' or 'layer' for your own Flax model, got {scope!r}")
    return prune_user_model(params, calib, method, sparsity, parse_pattern(pattern), scope, apply_fn, prunable, **kw)


def _validate(params, sparsity, pattern, scope, prunable):
    sparsity = check_sparsity(sparsity)
    nm = parse_pattern(pattern)
    if not isinstance(scope, str) or scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {SCOPES}, got {scope!r}")
    prunable = prunable or default_prunable
    require_layer_list(params, "pruning")
    paths = kernel_paths(params, prunable)
    if not paths:
        raise InvalidArgumentError("the prunable predicate selects no 2-D kernel")
    tree = params.tree
    for path in paths:
        k = get_path(tree, path)
        if nm and k.shape[0] % nm[1]:
            raise InvalidArgumentError(f"N:M pattern {nm[0]}:{nm[1]}: M={nm[1]} does not divide the input size "
                                       f"{k.shape[0]} of {path_key(path)}")
        finite = jnp.isfinite(k).all()
        if not isinstance(finite, jax.core.Tracer) and not bool(finite):  # unchecked inside a user's trace
            raise InvalidArgumentError(f"{path_key(path)} holds NaN or Inf weights")
    return sparsity, nm, prunable, paths


def _validate_tokens(params: Params, calib):
    if not (isinstance(calib, jax.Array) and not calib.is_fully_addressable):
        return jnp.asarray(check_tokens(params.config, calib))
    t = jax.ShapeDtypeStruct(calib.shape, calib.dtype)   # a multi-process batch: check its shape only
    if len(t.shape) != 2 or t.shape[0] == 0 or t.shape[1] < 2:
        raise DataError(f"calibration tokens must be an int array [n >= 1, seqlen >= 2], got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise DataError(f"calibration tokens must be integer ids, got {t.dtype}")
    return calib


def _placement(params: Params, mesh, batch_size: int):
    """(params on the mesh, chunk placement, batch size) for data-parallel calibration (`batch_size`
    is rounded up to a multiple of the mesh's data axis).

    The mesh is `mesh` or the one `params` are already sharded over; without either,
    nothing is placed. Params not yet on the mesh get the tensor-parallel rules."""
    from jaxprune.parallel import distributed
    mesh = mesh or distributed.mesh_of(params)
    if mesh is None:
        return params, None, batch_size
    if distributed.DATA not in mesh.shape:
        raise InvalidArgumentError(f"the mesh needs a '{distributed.DATA}' axis, got axes {tuple(mesh.shape)}")
    if distributed.mesh_of(params) is None:
        params = distributed.shard_params(params, mesh)
    d = mesh.shape[distributed.DATA]
    return params, (lambda t: distributed.shard_batch(t, mesh)), -(-batch_size // d) * d


def _layer_sparsities(params: Params, sparsity: float, per_layer) -> list[float]:
    L = len(params.tree["layers"])
    if per_layer is None:
        return [sparsity] * L
    if isinstance(per_layer, (str, bytes)) or not hasattr(per_layer, "__len__"):
        raise InvalidArgumentError(f"per_layer_sparsity must be a sequence of {L} sparsities, got "
                                   f"{type(per_layer).__name__}")
    per_layer = [check_sparsity(s.item() if isinstance(s, (np.ndarray, jax.Array)) and s.ndim == 0 else s)
                 for s in per_layer]   # 0-d arrays when per_layer is an array
    if len(per_layer) != L:
        raise InvalidArgumentError(f"per-layer sparsities have {len(per_layer)} entries for {L} layers")
    return per_layer


def _assemble(params: Params, layer_masks, new_layers=None):
    masks = full_masks(params).tree
    masks = {**masks, "layers": list(masks["layers"])}
    for i, lm in enumerate(layer_masks):
        layer = masks["layers"][i]
        for path, keep in lm.items():
            layer = set_path(layer, path + ("kernel",), keep)
        masks["layers"][i] = layer
    out_masks = params.replace(masks)
    if new_layers is None:
        return out_masks
    return params.replace({**params.tree, "layers": list(new_layers)}), out_masks


def _like(tree, params):
    from jaxprune.parallel.distributed import like
    return like(tree, params)


def _column_block(n_out: int, limit: int = 1024) -> int:
    """The largest divisor of `n_out` up to `limit` (n_out itself when that is small)."""
    if n_out <= limit:
        return n_out
    return max(d for d in range(1, limit + 1) if n_out % d == 0)


# Wanda selects a CPU kernel on the host up to this many scores (4 MiB of float32 scores; SmolLM2's
# largest kernel has 884,736).
HOST_SELECT_MAX = 1 << 20


@dataclasses.dataclass(frozen=True)
class WandaRule:
    """Wanda's prune rule for `run_layerwise` / `LayerPruner`: |W| * ||X|| scores, `n` (traced) pruned
    per comparison group (`scope`), or the N:M pattern `nm`. Hashable: equal rules share programs."""

    nm: tuple | None = None
    scope: str = "row"
    uses_path = False

    def counts(self, shape, sparsity: float) -> int:
        return 0 if self.nm else n_pruned(group_size(shape, self.scope), sparsity)

    def __call__(self, path, dense, stat, count, n):
        nm, scope = self.nm, self.scope
        kernel = dense["kernel"]
        norms = stat / count
        bs = _column_block(kernel.shape[1], max(64, (1 << 20) // kernel.shape[0]))   # <= 1M scores per block
        if scope != "row" or bs == kernel.shape[1] or bs < 64:
            keep = select_count(criteria.wanda(kernel, norms), n, nm, scope)
        else:
            # Rows (outputs) are compared independently: select in blocks of columns so the float32
            # scores and selection temporaries of a 7B-sized matrix never exist all at once.
            # The loop works on the kernel's bits as unsigned ints: on CPU, XLA would otherwise upcast a
            # bfloat16 kernel to float32 whole, before the loop, for the slicing. Pruned blocks are
            # written back into the same (donatable) buffer: +0.0 has zero bits.
            bits = jax.lax.bitcast_convert_type(kernel, jnp.dtype(f"uint{8 * kernel.dtype.itemsize}"))

            def block(j, carry):
                keep, bits = carry
                col_bits = jax.lax.dynamic_slice_in_dim(bits, j * bs, bs, axis=1)
                k = select_count(criteria.wanda(jax.lax.bitcast_convert_type(col_bits, kernel.dtype), norms), n, nm,
                                 scope)
                return (jax.lax.dynamic_update_slice_in_dim(keep, k, j * bs, axis=1),
                        jax.lax.dynamic_update_slice_in_dim(bits, jnp.where(k, col_bits, 0), j * bs, axis=1))
            keep, bits = jax.lax.fori_loop(0, kernel.shape[1] // bs, block, (jnp.zeros(kernel.shape, bool), bits))
            return {**dense, "kernel": jax.lax.bitcast_convert_type(bits, kernel.dtype)}, keep
        return {**dense, "kernel": jnp.where(keep, kernel, 0)}, keep

    def prune_host(self, dense, stat, count, n):
        """`self(path, dense, stat, count, n)` on the host for a kernel, statistic and count each held
        whole by one CPU device: the same scores in float32 and the same mask (numpy's introselect,
        `nm_keep_host` for N:M), several times faster than the compiled selection. None where it does
        not apply (accelerators, sharded or traced arrays, M > TORCH_TIES_MAX_M, M not dividing), or
        for a kernel of more than HOST_SELECT_MAX scores: the compiled rule selects those in blocks of
        columns, so a 7B-sized matrix's float32 scores never exist whole."""
        kernel = dense["kernel"]
        if kernel.ndim != 2 or kernel.size > HOST_SELECT_MAX or not (on_host(kernel) and on_host(stat) and on_host(count)):
            return None
        if self.nm is not None and (self.nm[1] > TORCH_TIES_MAX_M or kernel.shape[0] % self.nm[1]):
            return None
        norms = host_view(stat).astype(np.float32) / host_view(count).astype(np.float32)
        scores = np.abs(_host_float32(kernel)) * np.sqrt(norms)[:, None]
        keep = _select_host(scores, int(n), self.nm, self.scope)
        return {**dense, "kernel": jnp.asarray(np.where(keep, host_view(kernel), 0))}, jnp.asarray(keep)


@dataclasses.dataclass(frozen=True)
class SparseGPTRule:
    """SparseGPT's prune rule for `run_layerwise` / `LayerPruner`: the OBS solve with the per-block
    prune counts `n = (k_full, k_last)` traced (`block_counts`), or the N:M pattern `nm`."""

    nm: tuple | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    uses_path = False

    def counts(self, shape, sparsity: float) -> tuple[int, int]:
        return block_counts(shape[1], shape[0], sparsity, self.blocksize)

    def __call__(self, path, dense, stat, count, n):
        k_full, k_last = n
        new, keep = solve(dense["kernel"], 2.0 * stat / count, k_full, k_last, nm=self.nm, blocksize=self.blocksize,
                          percdamp=self.percdamp)
        return {**dense, "kernel": new}, keep

    def prune_group(self, denses, stat, count, ns):
        """Kernels that share one input (and so `stat`) solved together (`solve_group`)."""
        results = solve_group(tuple(d["kernel"] for d in denses), 2.0 * stat / count, tuple(ns), nm=self.nm,
                              blocksize=self.blocksize, percdamp=self.percdamp)
        return [({**d, "kernel": new}, keep) for d, (new, keep) in zip(denses, results)]


def _wanda_dense(nm, scope) -> WandaRule:     # the names jaxprune.oneshot.streaming builds its rules with
    return WandaRule(nm, scope)


def _sparsegpt_dense(nm, blocksize, percdamp) -> SparseGPTRule:
    return SparseGPTRule(nm, blocksize, percdamp)


def _targets(params: Params, paths) -> list[set]:
    """Per layer, the module paths to prune: ('layers', i, *module, 'kernel') -> module."""
    out = [set() for _ in params.tree["layers"]]
    for p in paths:
        out[p[1]].add(tuple(p[2:-1]))
    return out


def _check_layer_only(paths, method):
    outside = [path_key(p) for p in paths if p[0] != "layers"]
    if outside:
        raise InvalidArgumentError(f"{method} prunes linear layers inside the transformer blocks; the prunable "
                                   f"set also selects {outside[:3]}: prune those with jaxprune.magnitude")


@partial(jax.jit, static_argnames=("nm", "scope"))
def _magnitude_select(kernel, n_prune, nm, scope):
    """Magnitude masks of one kernel, `n_prune` (traced) pruned per group."""
    return select_count(criteria.magnitude(kernel), n_prune, nm, scope)


def _host_float32(kernel) -> np.ndarray:
    """A CPU kernel as a float32 numpy array (no copy when it already is one)."""
    w = host_view(kernel)
    return w if w.dtype == np.float32 else w.astype(np.float32)


def _magnitude_select_host(kernel, n_prune: int, scope: str):
    """`_magnitude_select` (unstructured) for a kernel on the CPU, selected by numpy: the same mask."""
    w = _host_float32(kernel)
    key = np.ascontiguousarray(w).view(np.int32) & np.int32(0x7FFFFFFF)   # _sortable_key(|w|)
    if scope == "row" and w.ndim == 2:
        keep = keep_top_host(None, w.shape[0] - n_prune, axis=0, key=key)
    else:
        keep = keep_top_host(None, w.size - n_prune, key=key.reshape(-1)).reshape(w.shape)
    return jnp.asarray(keep)


def _select_host(scores: np.ndarray, n_prune: int, nm, scope: str) -> np.ndarray:
    """`select_count` on the host for float32 scores [in, out]: the same mask (N:M groups of M
    consecutive inputs by `nm_keep_host`, else numpy's introselect per output row or per tensor)."""
    if nm is not None:
        n, m = nm
        return nm_keep_host(scores.reshape(scores.shape[0] // m, m, scores.shape[1]), n).reshape(scores.shape)
    if scope == "row" and scores.ndim == 2:
        return keep_top_host(scores, scores.shape[0] - n_prune, axis=0)
    return keep_top_host(scores.reshape(-1), scores.size - n_prune).reshape(scores.shape)


def _magnitude_nm_host(kernel, nm):
    """`_magnitude_select` for an N:M pattern on a CPU kernel [in, out]: the same mask, each group of
    M consecutive inputs of an output selected on the host (`nm_keep_host`)."""
    return jnp.asarray(_select_host(np.abs(_host_float32(kernel)), 0, nm, "row"))


def _magnitude_kernel(kernel, n_prune: int, nm, scope: str):
    """One kernel's magnitude mask: selected on the host for a CPU kernel (numpy for unstructured
    masks, fixed-shape pieces for N:M), else compiled for its shape."""
    if on_host(kernel) and (nm is None or nm[1] <= TORCH_TIES_MAX_M):
        return _magnitude_select_host(kernel, n_prune, scope) if nm is None else _magnitude_nm_host(kernel, nm)
    return _magnitude_select(kernel, n_prune, nm=nm, scope=scope)


@partial(jax.jit, static_argnames="sparsity")
def _global_magnitude(kernels: dict, sparsity: float):
    return global_masks({k: criteria.magnitude(v) for k, v in kernels.items()}, sparsity)


def magnitude(params: Params, sparsity: float = 0.5, pattern=None, scope: str = "layer",
              prunable: Callable | None = None, mesh=None):
    """Masks keeping the largest |W| (Han et al. 2015).

    Args:
      params: model `Params`.
      sparsity: fraction pruned in each comparison group, in [0, 1).
      pattern: None/'unstructured', or 'N:M' (keep N of every M consecutive inputs).
      scope: comparison group: 'layer' (each weight matrix; the reference's default), 'row'
        (each output), 'global' (all prunable weights together).
      prunable: predicate over plain paths; default `default_prunable` (for your own Flax
        params: every leaf named `kernel`).
      mesh: a ``("data", "model")`` mesh (`jaxprune.parallel.distributed.make_mesh`) to place params
        on (tensor-parallel rules) when they are not sharded yet.

    Returns:
      a mask pytree shaped like `params` (True = keep), sharded like sharded params.

    Example:
        >>> masks = jp.magnitude(params, sparsity=0.5)                 # doctest: +SKIP
    """
    if _is_user_params(params):
        return _user(params, None, "magnitude", sparsity, pattern, scope, None, prunable)
    sparsity, nm, prunable, paths = _validate(params, sparsity, pattern, scope, prunable)
    params, _, _ = _placement(params, mesh, 1)
    kernels = {path: get_path(params.tree, path) for path in paths}
    if scope == "global" and nm is None:
        keep = _global_magnitude({path_key(p): k for p, k in kernels.items()}, sparsity)
        chosen = {p: keep[path_key(p)] for p in kernels}
    else:
        chosen = {p: _magnitude_kernel(k, n_pruned(group_size(k.shape, scope), sparsity), nm, scope)
                  for p, k in kernels.items()}
    masks = full_masks(params)
    return _like(jax.tree_util.tree_map_with_path(lambda kp, m: chosen.get(plain_path(kp), m), masks), params)


def wanda(params: Params, calib, sparsity: float = 0.5, pattern=None, scope: str = "row",
          mode: str = "sequential", per_layer_sparsity: Sequence[float] | None = None,
          prunable: Callable | None = None, batch_size: int | None = None, show_progress=None, apply_fn=None, mesh=None):
    """Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs").

    Score |W_ij| * ||X_i||_2 (input-feature norms over calibration tokens), compared within each
    output row by default.

    Args:
      params: model `Params`.
      calib: calibration tokens int [n, seqlen] (e.g. `jaxprune.calibration_windows`), or
        precomputed statistics `{"sums": {keystr(kernel path): sum of x^2 [in]}, "count": tokens}`
        from `jaxprune.input_stats(..., "sumsq")` (summed over your own batches/devices).
      sparsity: fraction pruned per comparison group, in [0, 1).
      pattern: None/'unstructured' or 'N:M' ('2:4', '4:8': keep N of every M inputs).
      scope: 'row' (each output; Wanda's default) or 'layer' (each matrix).
      mode: 'sequential' (reference), 'as-you-go' (one pass per layer) or 'dense' (one pass).
      per_layer_sparsity: one sparsity per layer (e.g. from `jaxprune.owl_sparsities`).
      prunable: predicate over plain paths; default: linear layers inside the blocks.
      batch_size: calibration windows per forward; default (`calibration.driver.default_batch_size`):
        about 1,024 tokens on CPU, 8 windows on accelerators.
      apply_fn: for your own Flax model (`params` a linen dict or `nnx.State`):
        `apply_fn(params, batch)` runs it; `calib` is then a batch of its inputs or a list of
        batches, and statistics come from one pass of the unpruned model.
      mesh: data-parallel calibration over a ``("data", "model")`` mesh
        (`jaxprune.parallel.distributed.make_mesh`): each calibration batch is split over ``"data"``,
        params not yet sharded are placed tensor-parallel over ``"model"``, and the sharded
        jit sums statistics across devices. Params already sharded over a mesh use that mesh.

    Returns:
      a mask pytree shaped like `params` (True = keep), sharded like sharded params.

    Example:
        >>> masks = jp.wanda(params, calib, sparsity=0.5, pattern="2:4")   # doctest: +SKIP
    """
    if _is_user_params(params):
        return _user(params, calib, "wanda", sparsity, pattern, scope, apply_fn, prunable)
    sparsity, nm, prunable, paths = _validate(params, sparsity, pattern, scope, prunable)
    if scope == "global":
        raise InvalidArgumentError("wanda compares within rows or layers; use scope='row' or 'layer'")
    _check_layer_only(paths, "wanda")
    sparsities = _layer_sparsities(params, sparsity, per_layer_sparsity)
    if batch_size is not None:   # checked before any work, also where statistics are given
        check_int("batch_size", batch_size)
    prune_dense = WandaRule(nm, scope)
    if isinstance(calib, dict):
        return _assemble(params, _from_stats(params, calib, paths, prune_dense, sparsities, "sumsq"))
    tokens = _validate_tokens(params, calib)
    params, place, batch_size = _placement(params, mesh, default_batch_size(tokens.shape[1], batch_size))
    _, layer_masks = run_layerwise(params, tokens, "sumsq", prune_dense, sparsities, _targets(params, paths), mode=mode,
                                   batch_size=batch_size, show_progress=show_progress, description="wanda",
                                   place=place)
    return _like(_assemble(params, layer_masks), params)


def sparsegpt(params: Params, calib, sparsity: float = 0.5, pattern=None, mode: str = "sequential",
              per_layer_sparsity: Sequence[float] | None = None, blocksize: int = 128, percdamp: float = 0.01,
              prunable: Callable | None = None, batch_size: int | None = None, show_progress=None, apply_fn=None,
              mesh=None):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with weight updates, layer by layer.

    Args are as for `wanda`; statistics are Hessians (`input_stats(..., "hessian")`).
    `blocksize` columns per block (M must divide it for N:M); `percdamp` is the damping
    fraction of the mean Hessian diagonal.

    Returns:
      (new params with updated, pruned weights, mask pytree).

    Example:
        >>> new_params, masks = jp.sparsegpt(params, calib, sparsity=0.5)   # doctest: +SKIP
    """
    if _is_user_params(params):
        return _user(params, calib, "sparsegpt", sparsity, pattern, "layer", apply_fn, prunable,
                     blocksize=blocksize, percdamp=percdamp)
    sparsity, nm, prunable, paths = _validate(params, sparsity, pattern, "layer", prunable)
    check_int("blocksize", blocksize)
    if nm and blocksize % nm[1]:
        raise InvalidArgumentError(f"blocksize={blocksize} must be a multiple of M={nm[1]}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float, np.integer, np.floating)) \
            or not 0 <= percdamp < 1:
        raise InvalidArgumentError(f"percdamp must lie in [0, 1), got {percdamp}")
    _check_layer_only(paths, "sparsegpt")
    sparsities = _layer_sparsities(params, sparsity, per_layer_sparsity)
    if batch_size is not None:   # checked before any work, also where statistics are given
        check_int("batch_size", batch_size)
    prune_dense = SparseGPTRule(nm, blocksize, percdamp)
    if isinstance(calib, dict):
        layers, layer_masks = _from_stats(params, calib, paths, prune_dense, sparsities, "hessian", updates=True)
        return _assemble(params, layer_masks, layers)
    tokens = _validate_tokens(params, calib)
    params, place, batch_size = _placement(params, mesh, default_batch_size(tokens.shape[1], batch_size))
    new_layers, layer_masks = run_layerwise(params, tokens, "hessian", prune_dense, sparsities,
                                            _targets(params, paths), mode=mode,
                                            batch_size=batch_size, show_progress=show_progress,
                                            description="sparsegpt", place=place)
    new_params, masks = _assemble(params, layer_masks, new_layers)
    return _like(new_params, params), _like(masks, params)


@partial(jax.jit, static_argnames="rule")
def _prune_layer_jit(lp, stats, count, counts, rule):
    return prune_layer(lp, stats, count, rule, counts)


def _from_stats(params, stats, paths, prune_dense, sparsities, kind, updates=False):
    """Prune every layer from precomputed statistics (no forward pass)."""
    if "sums" not in stats or "count" not in stats:
        raise InvalidArgumentError("precomputed statistics must be {'sums': {...}, 'count': n} "
                                   f"(from jaxprune.input_stats(params, tokens, {kind!r}))")
    sums, count = stats["sums"], jnp.asarray(stats["count"], jnp.float32)
    missing = [path_key(p) for p in paths if path_key(p) not in sums]
    if missing:
        raise InvalidArgumentError(f"statistics are missing for {missing[:3]} ({len(missing)} kernels)")
    layers, masks = [], []
    for i, lp in enumerate(params.tree["layers"]):
        st = {p[2:-1]: sums[path_key(p)] for p in paths if p[1] == i}
        new, m = _prune_layer_jit(lp, st, count, prune_counts(prune_dense, lp, st, sparsities[i]), rule=prune_dense)
        layers.append(new)
        masks.append(m)
    return (layers, masks) if updates else masks
