"""Structured pruning: units and their costs, compaction, Bonsai, FinerCut, L0."""

from jaxprune.structured.compact import (
    effective_gates,
    param_count,
)
from jaxprune.structured.units import (
    non_embedding_params,
    gates_lib,
    UNIT_KINDS,
    PRIOR_KINDS,
    gate_shapes,
    check_kinds,
    unit_costs,
    prior,
    ones,
    expected_size,
)
from jaxprune.structured.hardconcrete import (
    BETA,
    GAMMA,
    ZETA,
    deterministic,
    prob_nonzero,
    sample,
)
from jaxprune.structured.utility import (
    perplexity_utility,
    evaluate,
)
from jaxprune.structured.result import (
    StructuredResult,
)
from jaxprune.structured.bonsai import (
    structured,
    sampling_weights,
    antithetic_masks,
    ridge,
    ridge_cv,
)
from jaxprune.structured.finercut import (
    non_embedding_params,
    KINDS,
    sublayer_params,
    FinerCutResult,
    jsd,
)
from jaxprune.structured.l0 import (
    L0Result,
    ascent,
    final_gates,
    init_log_alphas,
    l0_loss,
    l0_optimizer,
    l0_prune,
    l0_step,
    lagrangian,
    size_targets,
    warmed_targets,
)
