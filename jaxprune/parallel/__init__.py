"""Meshes, tensor-parallel partition specs from each family's Layout, data-parallel statistics, multi-host start-up."""

from jaxprune.parallel.distributed import (
    DATA,
    MODEL,
    batch_sharding,
    data_parallel_stats,
    gather,
    is_sharded,
    like,
    local_batch,
    make_mesh,
    mesh_of,
    param_shardings,
    param_specs,
    replicated,
    shard_batch,
    shard_params,
    spec_for,
)
from jaxprune.parallel.loading import load_sharded
from jaxprune.parallel.multihost import ENV, initialize
