"""One-shot pruning: `prune` (one entry point), magnitude, Wanda, SparseGPT, OWL, layer streaming."""

from jaxprune.oneshot.pruning import (
    SCOPES,
    default_prunable,
    kernel_paths,
    WandaRule,
    SparseGPTRule,
    magnitude,
    wanda,
    sparsegpt,
)
from jaxprune.oneshot.contract import (
    ONE_SHOT_METHODS,
    PruneResult,
    prune,
)
from jaxprune.oneshot.owl import (
    outlier_ratios,
    allocate,
    owl_sparsities,
)
from jaxprune.oneshot.streaming import (
    layer_bytes,
    load_masks,
    prune_streaming,
    write_random_checkpoint,
)
