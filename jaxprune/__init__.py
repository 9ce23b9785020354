"""jaxprune: prune large language models in JAX/Flax.

Example:
    >>> import jaxprune as jp
    >>> params = jp.load("smollm2-135m")                                   # doctest: +SKIP
    >>> tok = jp.tokenizer("smollm2-135m")                                 # doctest: +SKIP
    >>> ev = jp.eval_windows(tok, jp.bundled_text("prideprejudice"), seqlen=512)  # doctest: +SKIP
    >>> jp.perplexity(params, ev, seqlen=512)                              # doctest: +SKIP
"""

from .config import LlamaConfig, OPTConfig
from .models.gemma import Gemma2Config, Gemma3Config
from .models.mistral import MistralConfig
from .models.qwen import Qwen2Config, Qwen3Config
from .data import bundled_text, calibration_windows, eval_windows, read_text
from .errors import CheckpointError, DataError, InvalidArgumentError, JaxpruneError, UnsupportedModelError
from .evaluate import perplexity
from .io.checkpoints import checkpoint_args, load_checkpoint, restore_checkpoint, save_checkpoint
from .io.compressed import load_compressed, save_compressed
from .io.export import load_masks, save
from .io.resolve import load, tokenizer
from .calibration import input_stats
from .compact import compact
from .bonsai import bonsai
from .finercut import finercut
from .l0 import l0_prune
from .lora import lora_finetune, lora_merge
from .training import keep_masked
from .masks import apply_masks, summary as sparsity_summary
from .models import forward, init
from .owl import owl_sparsities
from .pruning import default_prunable, magnitude, sparsegpt, wanda
from .params import Params
from .tasks import continuation_accuracy, continuation_task, generation_task, last_word_accuracy, last_word_task
from .tasks import write_lm_eval_task
from .generation_metrics import evaluate_generation, hidden_state_embedder, nonzero_parameters, rouge_scores
from . import report


def __getattr__(name):
    # JaxpruneLM subclasses lm-eval's LM, so it is built (and lm-eval imported) only on first use.
    if name == "JaxpruneLM":
        from .harness import JaxpruneLM
        return JaxpruneLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
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
    "magnitude",
    "owl_sparsities",
    "sparsegpt",
    "sparsity_summary",
    "wanda",
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
