"""Statistics of linear layers' inputs (capture) and the layer-by-layer driver."""

from jaxprune.calibration.capture import (
    STAT_KINDS,
    MODES,
    plain_path,
    path_key,
    input_stat,
    BLOCK_BYTES,
    blocked_matmuls,
    input_stats,
)
from jaxprune.calibration.driver import (
    prune_layer,
    prune_counts,
    LayerPruner,
    embed_chunks,
    run_layerwise,
)
from jaxprune.calibration.flax_models import (
    user_default_prunable,
    collect,
    prune_user_model,
)
