"""jaxprune: prune large language models in JAX/Flax.

Example:
    >>> import jaxprune as jp
    >>> params = jp.load("smollm2-135m")                                   # doctest: +SKIP
    >>> tok = jp.tokenizer("smollm2-135m")                                 # doctest: +SKIP
    >>> ev = jp.eval_windows(tok, jp.bundled_text("prideprejudice"), seqlen=512)  # doctest: +SKIP
    >>> jp.perplexity(params, ev, seqlen=512)                              # doctest: +SKIP
"""

from jaxprune.models.config import LlamaConfig, OPTConfig
from jaxprune.models.gemma import Gemma2Config, Gemma3Config
from jaxprune.models.mistral import MistralConfig
from jaxprune.models.qwen import Qwen2Config, Qwen3Config
from jaxprune.data.text import bundled_text, calibration_windows, eval_windows, read_text
from jaxprune.errors import CheckpointError, DataError, InvalidArgumentError, JaxpruneError, UnsupportedModelError
from jaxprune.evaluation.perplexity import perplexity
from jaxprune.io.checkpoints import checkpoint_args, load_checkpoint, restore_checkpoint, save_checkpoint
from jaxprune.io.compressed import load_compressed, save_compressed
from jaxprune.io.export import load_masks, save
from jaxprune.io.resolve import load, tokenizer
from jaxprune.calibration.capture import input_stats
from jaxprune.structured.compact import compact
from jaxprune.structured.bonsai import bonsai
from jaxprune.structured.finercut import finercut
from jaxprune.structured.l0 import l0_prune
from jaxprune.training.lora import lora_finetune, lora_merge
from jaxprune.training.distill import DistillResult, distill
from jaxprune.training.masked import keep_masked
from jaxprune.sparsity.masks import apply_masks, summary as sparsity_summary
from jaxprune.models import forward, init
from jaxprune.oneshot.owl import owl_sparsities
from jaxprune.oneshot.pruning import default_prunable, magnitude, sparsegpt, wanda
from jaxprune.oneshot.contract import ONE_SHOT_METHODS, PruneResult, prune
from jaxprune.core.params import Params
from jaxprune.evaluation.tasks import continuation_accuracy, continuation_task, generation_task, last_word_accuracy, last_word_task
from jaxprune.evaluation.tasks import write_lm_eval_task
from jaxprune.evaluation.generation_metrics import evaluate_generation, hidden_state_embedder, nonzero_parameters, rouge_scores
from jaxprune.generation.engine import generate
from jaxprune import report


def __getattr__(name):
    # JaxpruneLM subclasses lm-eval's LM, so it is built (and lm-eval imported) only on first use.
    if name == "JaxpruneLM":
        from jaxprune.evaluation.harness import JaxpruneLM
        return JaxpruneLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "generate",
    "CheckpointError",
    "DataError",
    "InvalidArgumentError",
    "JaxpruneError",
    "LlamaConfig",
    "OPTConfig",
    "Gemma2Config",
    "Gemma3Config",
    "MistralConfig",
    "Qwen2Config",
    "Qwen3Config",
    "Params",
    "apply_masks",
    "bonsai",
    "compact",
    "finercut",
    "default_prunable",
    "input_stats",
    "keep_masked",
    "l0_prune",
    "lora_finetune",
    "lora_merge",
    "distill",
    "DistillResult",
    "magnitude",
    "owl_sparsities",
    "sparsegpt",
    "sparsity_summary",
    "wanda",
    "prune",
    "PruneResult",
    "ONE_SHOT_METHODS",
    "UnsupportedModelError",
    "bundled_text",
    "calibration_windows",
    "eval_windows",
    "forward",
    "init",
    "load",
    "perplexity",
    "read_text",
    "report",
    "save",
    "save_checkpoint",
    "save_compressed",
    "load_checkpoint",
    "load_compressed",
    "load_masks",
    "checkpoint_args",
    "restore_checkpoint",
    "tokenizer",
    "JaxpruneLM",
    "last_word_task",
    "last_word_accuracy",
    "continuation_task",
    "continuation_accuracy",
    "generation_task",
    "write_lm_eval_task",
    "evaluate_generation",
    "rouge_scores",
    "nonzero_parameters",
    "hidden_state_embedder",
]
