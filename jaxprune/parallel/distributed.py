"""Meshes, sharded params and batches, data-parallel statistics (loading onto a mesh is
`jaxprune.parallel.loading`, multi-host start-up `jaxprune.parallel.multihost`).

jaxprune scales with JAX's own runtime: a `jax.sharding.Mesh` with axes
``("data", "model")``, params placed by `param_shardings` (tensor-parallel over
attention heads and FFN channels, everything else replicated), calibration batches
split over ``"data"``, and jitted code that GSPMD partitions. Statistics are sums, so
a sharded jit (or `psum` inside `shard_map`/`pmap`) reduces them across devices.

Tensor-parallel rules (kernels are ``[in, out]``):

=============================================  ============================
q/k/v_proj, gate/up_proj, fc1 (kernel, bias)   output axis over ``"model"``
o_proj/out_proj, down_proj, fc2 (kernel)       input axis over ``"model"``
everything else                                replicated
=============================================  ============================

Attention projections are split by whole heads (K/V by whole K/V heads); a weight
whose split axis the ``"model"`` size does not divide stays replicated.

Example (8 CPU devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``):
    >>> import jax, jaxprune as jp
    >>> from jaxprune.parallel import distributed
    >>> mesh = distributed.make_mesh(model=1)                       # all devices on "data"
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = distributed.shard_params(jp.init(cfg, jax.random.key(0)), mesh)
    >>> calib = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    >>> masks = jp.wanda(params, calib, sparsity=0.5, mesh=mesh)    # data-parallel statistics
    >>> masks["layers"][0]["mlp"]["up_proj"]["kernel"].sharding == params["layers"][0]["mlp"]["up_proj"]["kernel"].sharding
    True
"""

from __future__ import annotations


import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxprune.calibration.capture import input_stats, plain_path
from jaxprune.errors import InvalidArgumentError
from jaxprune.core.params import Params
from jaxprune.models.layout import layout_of

DATA, MODEL = "data", "model"


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ``("data", "model")`` mesh over `devices` (default: every device of every process).

    `data` defaults to ``len(devices) // model``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise InvalidArgumentError(f"model={model} must divide the device count {len(devices)}")
    data = len(devices) // model if data is None else int(data)
    if data * model != len(devices):
        raise InvalidArgumentError(f"data x model = {data} x {model} must equal the device count {len(devices)}")
    # Auto axes: GSPMD propagates shardings through jaxprune's unannotated code (JAX's
    # default for new meshes is Explicit sharding, which needs annotations everywhere).
    # Devices fill the mesh in the order given (row-major), so a caller decides which
    # devices share a "model" group, e.g. across processes.
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def spec_for(path: tuple, shape: tuple, config, model_size: int) -> P:
    """The `PartitionSpec` of one parameter (plain path, shape) under the tensor-parallel rules."""
    if len(path) < 3 or path[0] != "layers" or model_size == 1:
        return P()
    lay = layout_of(config)
    axis = lay.split_axis(path[2:], len(shape))
    if axis is None:
        return P()
    size = shape[axis]
    units = size // _head_dim(config) if lay.split_unit(path[2:]) in ("heads", "groups") else size
    if units % model_size:
        return P()
    spec = [None] * len(shape)
    spec[axis] = MODEL
    return P(*spec)


def param_specs(params: Params, model_size: int) -> Params:
    """A tree of `PartitionSpec`s shaped like `params` (see the module's rules)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: spec_for(plain_path(kp), tuple(np.shape(x)), params.config, model_size), params)


def param_shardings(params: Params, mesh: Mesh) -> Params:
    """`NamedSharding`s for `params` on `mesh` (tensor-parallel over ``"model"``)."""
    model_size = mesh.shape.get(MODEL, 1)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, model_size),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Params, mesh: Mesh) -> Params:
    """`params` placed on `mesh` by `param_shardings`."""
    return jax.device_put(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh, n: int) -> NamedSharding:
    """Rows split over ``"data"`` when the data size divides `n`, otherwise replicated."""
    return NamedSharding(mesh, P(DATA) if n % mesh.shape[DATA] == 0 else P())


def shard_batch(tokens, mesh: Mesh):
    """A batch [n, ...] placed with its rows split over ``"data"`` (replicated if the split is uneven).

    In a multi-process run every process passes the same `tokens` (each keeps only its rows).
    """
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        return tokens   # already a global array
    return jax.device_put(tokens, batch_sharding(mesh, np.shape(tokens)[0]))


def local_batch(local_tokens, mesh: Mesh):
    """A global batch from this process's rows (`jax.make_array_from_process_local_data`)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA)), np.asarray(local_tokens))


def mesh_of(tree) -> Mesh | None:
    """The mesh of the first leaf of `tree` placed with a `NamedSharding`, if any."""
    for x in jax.tree.leaves(tree):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding):
            return s.mesh
    return None


def is_sharded(tree) -> bool:
    """Whether a leaf of `tree` is placed on a mesh (`NamedSharding`)."""
    return mesh_of(tree) is not None


def like(tree, reference):
    """`tree` placed with the shardings of `reference` (same structure), e.g. masks like params."""
    if not is_sharded(reference):
        return tree
    return jax.device_put(tree, jax.tree.map(lambda r: r.sharding, reference))


def data_parallel_stats(params: Params, tokens, kind: str, mesh: Mesh) -> dict:
    """`input_stats` with the batch split over ``"data"``: each device sums its rows and
    `psum` adds them (`jax.shard_map`). Params are replicated into the map."""
    n = np.shape(tokens)[0]
    if n % mesh.shape[DATA]:
        raise InvalidArgumentError(f"{n} calibration windows do not split evenly over {mesh.shape[DATA]} devices")

    def local(t):
        return jax.lax.psum(input_stats(params, t, kind), DATA)

    fn = jax.shard_map(local, mesh=mesh, in_specs=P(DATA), out_specs=P(), check_vma=False)
    return jax.jit(fn)(shard_batch(tokens, mesh))


def gather(tree):
    """Every leaf as a numpy array holding the global value (all processes take part)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


__all__ = ["DATA", "MODEL", "batch_sharding", "data_parallel_stats", "gather", "is_sharded",
           "like", "local_batch", "make_mesh", "mesh_of", "param_shardings", "param_specs", "replicated",
           "shard_batch", "shard_params", "spec_for"]
