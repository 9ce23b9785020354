"""Perplexity, scoring, proxy tasks, text metrics, generation metrics and the reasoning utility (the lm-eval adapter, `jaxprune.evaluation.harness`, imports lm-eval lazily and is not imported here)."""

from jaxprune.evaluation.perplexity import (
    model_logits,
    nll_sum,
)
from jaxprune.evaluation.tasks import (
    STOPWORDS,
    LastWordExample,
    ContinuationExample,
    GenerationExample,
    split_sentences,
    last_word_task,
    last_word_scores,
    last_word_accuracy,
    continuation_task,
    choice_scores,
    continuation_accuracy,
    generation_task,
    write_lm_eval_task,
)
from jaxprune.evaluation.generation_metrics import (
    ROUGE_TYPES,
    rouge_scores,
    nonzero_parameters,
    hidden_state_embedder,
    evaluate_generation,
)
from jaxprune.evaluation.text_metrics import (
    normalize_answer,
    token_f1,
    final_number,
    answer_accuracy,
    embedding_cosine,
    cosine_rows,
)
from jaxprune.evaluation.reasoning import ReasoningUtility
from jaxprune.evaluation.embedders import (
    MINILM_PACKAGE,
    minilm_model_dir,
    minilm_embedder,
)
