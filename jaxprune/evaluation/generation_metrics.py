"""Generation quality and cost of a (pruned) model, as in summarization-pruning studies of OPT.

For prompts and reference texts, `evaluate_generation` greedily generates a
continuation of each prompt and reports:

- **ROUGE-1/2/L**: mean F-measure of `rouge_score.rouge_scorer.RougeScorer(
  ["rouge1", "rouge2", "rougeL"], use_stemmer=True)` scoring each generation
  against its reference (`rouge-score` package, `pip install 'jaxprune[eval]'`).
- **embedding similarity**: mean cosine of generation and reference embeddings
  under `embed_fn` (`text_metrics.embedding_cosine`; e.g. `embedders.minilm_embedder()`).
  Without one, `hidden_state_embedder(params, tok)` is used: the evaluated
  model's own final hidden states (before the final norm), mean-pooled over
  token positions 1.. (position 0, the attention sink, carries outsized
  activations; a one-token text uses it). It is cheap and local but coarse, and
  each model embeds in its own space: to compare pruned models, pass one fixed
  `embed_fn` to all (e.g. the dense model's `hidden_state_embedder`).
- **efficiency**: non-zero parameters (entries != 0 over every array of the
  params), decoding seconds (compilation excluded) and generated tokens per
  second, decoded by the KV-cached engine (`jaxprune.generation`); unstructured zeros
  do not make it faster, compaction does.

Example:
    >>> rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"])["rougeL"]
    1.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import InvalidArgumentError, check_int
from jaxprune.core.buckets import length_bucket
from jaxprune.evaluation.scoring import _check_params, _check_tokenizer, eos_token_ids, model_max_length, prefix_token_id
from jaxprune.evaluation.text_generation import generate_ids
from jaxprune.models import hidden_states
from jaxprune.core.params import Params
from jaxprune.evaluation.text_metrics import embedding_cosine

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError(f"ROUGE needs the rouge-score package ({e}): pip install 'jaxprune[eval]'") from None
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _texts(name, texts) -> list[str]:
    if isinstance(texts, str) or not hasattr(texts, "__len__"):
        raise InvalidArgumentError(f"{name} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidArgumentError(f"{name}[{i}] must be a string, got {type(t).__name__}")
    return texts


def rouge_scores(generations, references) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure of each generation against its reference (stemmed).

    Example:
        >>> r = rouge_scores(["a cat sat"], ["a cat sat down"])
        >>> round(r["rouge1"], 4), round(r["rouge2"], 4)
        (0.8571, 0.8)
    """
    generations, references = _texts("generations", generations), _texts("references", references)
    if len(generations) != len(references) or not generations:
        raise InvalidArgumentError(f"need as many generations as references (>= 1), got "
                                   f"{len(generations)} and {len(references)}")
    scorer = _rouge_scorer()
    scores = [scorer.score(ref, gen) for gen, ref in zip(generations, references)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ROUGE_TYPES}


def nonzero_parameters(params: Params) -> tuple[int, int]:
    """(entries != 0, all entries) over every array of `params`.

    Example:
        >>> import jax, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> nz, total = nonzero_parameters(jp.init(cfg, jax.random.key(0)))
        >>> nz == total
        True
    """
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"expected jaxprune Params, got {type(params).__name__}")
    leaves = jax.tree.leaves(params)
    nz = sum(int(jnp.count_nonzero(x)) for x in leaves)
    return nz, sum(int(np.size(x)) for x in leaves)


@jax.jit
def _mean_hidden(params, tokens, mask, gates):
    h = hidden_states(params, tokens, gates).astype(jnp.float32)
    m = mask[..., None].astype(jnp.float32)
    return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def hidden_state_embedder(params: Params, tok, max_length: int = 256, batch_size: int = 16, gates=None):
    """`embed_fn`: texts -> float32 [n, D], mean of the model's final hidden states over positions 1..

    Texts are tokenized without special tokens (an empty text is the prefix
    token) and truncated to `max_length` tokens.

    Example:
        >>> import jax, jaxprune as jp
        >>> tok = jp.data.CharTokenizer(32)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> hidden_state_embedder(jp.init(cfg, jax.random.key(0)), tok)(["a cat", "a"]).shape
        (2, 16)
    """
    _check_params(params, gates)
    _check_tokenizer(tok, decode=False)
    batch_size = check_int("batch_size", batch_size)
    L = model_max_length(params, max_length)

    def embed(texts) -> np.ndarray:
        texts = _texts("texts", texts)
        ids = [(list(tok.encode(t)) or [prefix_token_id(tok)])[:L] for t in texts]
        out = np.zeros((len(ids), params.config.hidden_size), np.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            T = length_bucket(len(ids[chunk[0]]), L)
            B = min(batch_size, len(order))
            toks, mask = np.zeros((B, T), np.int32), np.zeros((B, T), bool)
            for r, i in enumerate(chunk):
                toks[r, :len(ids[i])] = ids[i]
                mask[r, 1 if len(ids[i]) > 1 else 0:len(ids[i])] = True
            pooled = np.asarray(_mean_hidden(params, jnp.asarray(toks), jnp.asarray(mask), gates))
            out[chunk] = pooled[:len(chunk)]
        return out

    return embed


def evaluate_generation(params: Params, tok, prompts, references, max_new_tokens: int = 32, embed_fn=None,
                       batch_size: int = 8, max_length: int | None = None, gates=None,
                       stop_token_ids=None) -> dict:
    """Greedy generations for `prompts` scored against `references`, with the model's size and speed.

    Args:
      params, tok: the model and its tokenizer.
      prompts, references: equally long lists of strings.
      max_new_tokens: tokens generated per prompt (fewer if a stop token comes first).
      embed_fn: `list[str] -> [n, d]` for the embedding similarity; default
        `hidden_state_embedder(params, tok)` (see the module docstring).
      batch_size, max_length, gates: as in `jaxprune.evaluation.text_generation.generate_ids`.
      stop_token_ids: ids that end a generation (default: the tokenizer's EOS).

    Returns:
      dict with "rouge1", "rouge2", "rougeL" (mean F), "embedding_similarity"
      (mean cosine), "nonzero_params", "total_params", "generation_seconds"
      (decoding, compilation excluded), "generated_tokens", "tokens_per_second",
      "n" and "generations" (the texts).

    Example:
        >>> import jax, jaxprune as jp
        >>> tok = jp.data.CharTokenizer(32)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> m = evaluate_generation(jp.init(cfg, jax.random.key(0)), tok, ["a cat"], ["sat"], max_new_tokens=4)
        >>> sorted(k for k in m if k.startswith("rouge")), m["n"]
        (['rouge1', 'rouge2', 'rougeL'], 1)
    """
    _check_tokenizer(tok)
    prompts, references = _texts("prompts", prompts), _texts("references", references)
    if len(prompts) != len(references) or not prompts:
        raise InvalidArgumentError(f"need as many prompts as references (>= 1), got {len(prompts)} and {len(references)}")
    if embed_fn is not None and not callable(embed_fn):
        raise InvalidArgumentError(f"embed_fn must be callable, got {type(embed_fn).__name__}")
    scorer = _rouge_scorer()      # fail before decoding when rouge-score is missing
    stops = eos_token_ids(tok) if stop_token_ids is None else stop_token_ids
    ids = [list(tok.encode(p)) or [prefix_token_id(tok)] for p in prompts]
    gen, seconds = generate_ids(params, ids, max_new_tokens, stops, None, batch_size, max_length, gates)
    texts = [tok.decode(g) for g in gen]
    scores = [scorer.score(ref, t) for t, ref in zip(texts, references)]
    if embed_fn is None:
        embed_fn = hidden_state_embedder(params, tok, gates=gates)
    cos = embedding_cosine(texts, references, embed_fn)
    nz, total = nonzero_parameters(params)
    n_tokens = sum(len(g) for g in gen)
    out = {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ROUGE_TYPES}
    out.update(embedding_similarity=float(np.mean(cos)), nonzero_params=nz, total_params=total,
               generation_seconds=seconds, generated_tokens=n_tokens,
               tokens_per_second=n_tokens / seconds if seconds > 0 else float("nan"),
               n=len(prompts), generations=texts)
    return out
