"""Scores, selection (row / layer / global / N:M) and masks, and the SparseGPT solver."""

from jaxprune.sparsity.criteria import (
    magnitude,
    wanda,
)
from jaxprune.sparsity.masks import (
    apply_masks,
    check_masks_like,
    check_sparsity,
    full_masks,
    global_masks,
    keep_top,
    mask_mismatch,
    nm_mask,
    parse_pattern,
    per_layer_mask,
    per_output_mask,
    select,
    select_count,
    summary,
)
from jaxprune.sparsity.sparsegpt import (
    hessian,
    block_counts,
    prune_kernel,
    solve,
)
