"""Training with masks kept: `keep_masked` for optax loops, LoRA recovery."""

from jaxprune.training.losses import (
    token_nll,
    mean_nll,
    lm_loss,
    distillation_loss,
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
