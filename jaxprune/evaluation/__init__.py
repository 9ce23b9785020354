"""Perplexity, proxy tasks, generation metrics and the reasoning utility (the lm-eval adapter, `jaxprune.evaluation.harness`, imports lm-eval and is not imported here)."""

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
from jaxprune.evaluation.reasoning import (
    gates_lib,
    num_submodels,
    greedy_generate,
    greedy_generate_batch,
    trim_generation,
    normalize_answer,
    token_f1,
    final_number,
    answer_accuracy,
    embedding_cosine,
    ReasoningUtility,
    MINILM_PACKAGE,
    minilm_model_dir,
    minilm_embedder,
)
