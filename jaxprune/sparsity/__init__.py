"""Scores, selection (row / layer / global / N:M) and masks, and the SparseGPT solver."""

from jaxprune.sparsity.criteria import (
    magnitude,
    wanda,
)
from jaxprune.sparsity.sparsegpt import (
    hessian,
    block_counts,
    prune_kernel,
    solve,
)
