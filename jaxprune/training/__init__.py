"""Training with masks kept: `keep_masked` for optax loops, LoRA recovery, recovery by distillation."""

from jaxprune.training.losses import (
    token_nll,
    head_nll,
    mean_nll,
    lm_loss,
    distillation_loss,
    kl_divergence,
    top_k_kl,
    top_k_targets,
    hidden_mse,
    random_batch,
)
from jaxprune.training.masked import (
    keep_masked,
)
from jaxprune.training.lora import (
    LoRAResult,
    lora_finetune,
    lora_init,
    lora_merge,
)
from jaxprune.training.teacher import (
    TopK,
    teacher_top_k,
)
from jaxprune.training.distill import (
    DistillResult,
    distill,
)
