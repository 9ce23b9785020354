"""Composite reasoning utility ("Reshaping Bonsai") for structured pruning.

A sub-model (a gates dict, see `jaxprune.models.gates`) is scored by greedily
decoding answers to a fixed set of prompts and comparing them with references::

    U = a1 * token_F1 + a2 * max(embedding_cosine, 0) + a3 * answer_accuracy

averaged over examples; higher is better and U lies in [0, 1].

- Answers come from the KV-cached engine (`jaxprune.generation.decode` /
  `decode_submodels`, the latter vmapped over stacked gates).
- The metrics are `jaxprune.evaluation.text_metrics`; embedders (all-MiniLM-L6-v2,
  the model's own hidden states) are `jaxprune.evaluation.embedders`.
- `ReasoningUtility`: the utility object; `evaluate_batch(params, stacked_gates)`
  scores many sub-models (one score each), `utility(params, gates)` one.

Example:
    >>> token_f1("The answer: 42.", "answer 42")
    1.0
    >>> answer_accuracy("4 or 42 or 420", "42")      # the final number counts
    0.0
"""

from __future__ import annotations

import math

import numpy as np

from jaxprune.core.params import Params
from jaxprune.errors import InvalidArgumentError
from jaxprune.evaluation.text_metrics import answer_accuracy, cosine_rows, token_f1
from jaxprune.generation.engine import decode, decode_submodels, stop_array, trim

# --------------------------------------------------------------------------- utility


def _check_weights(weights, embed_fn):
    try:
        w = tuple(float(x) for x in weights)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"weights must be three numbers (a1, a2, a3), got {weights!r}") from None
    if len(w) != 3 or not all(math.isfinite(x) for x in w):
        raise InvalidArgumentError(f"weights must be three finite numbers (a1, a2, a3), got {weights!r}")
    if min(w) < 0:
        raise InvalidArgumentError(f"weights must be non-negative, got {w}")
    if abs(sum(w) - 1.0) > 1e-6:
        raise InvalidArgumentError(f"weights must sum to 1, got {w} (sum {sum(w)})")
    if w[1] > 0 and embed_fn is None:
        raise InvalidArgumentError(f"embedding weight a2={w[1]} > 0 needs embed_fn(list[str]) -> [n, d]")
    if embed_fn is not None and not callable(embed_fn):
        raise InvalidArgumentError(f"embed_fn must be callable, got {type(embed_fn).__name__}")
    return w


class ReasoningUtility:
    """U = a1*token_F1 + a2*max(cosine, 0) + a3*answer_accuracy, averaged over examples.

    Greedy answers to `prompts` (tokenized once, here) are compared with
    `references`. Implements the host-side utility protocol:
    `evaluate_batch(params, stacked_gates, batch_size=None) -> np.ndarray [S]`
    (higher = better), and `utility(params, gates=None) -> float` for one model.
    It is not jax-traceable: callers must dispatch on `evaluate_batch` first.

    Args:
      tokenizer: `encode(str) -> list[int]`, `decode(ids) -> str`; its
        `eos_token_id` (int or list) stops generation unless `stop_token_ids` is given.
      prompts, references: equally long lists of strings.
      embed_fn: `list[str] -> [n, d]`, required iff a2 > 0 (e.g. `minilm_embedder()`).
      weights: (a1, a2, a3), non-negative, summing to 1.
      max_new_tokens: tokens generated per prompt.
      batch_size: default number of sub-models decoded at once (None: all).
      until: strings before whose first occurrence each generation is cut (e.g. the
        ``"Question:"`` a few-shot model starts the next example with), as lm-eval's
        `generate_until` cuts; so the final number scored is the answer's, not the next example's.

    Example:
        >>> import jax, jax.numpy as jnp, jaxprune as jp
        >>> class Bytes:                                   # a toy byte-level tokenizer
        ...     eos_token_id = 0
        ...     encode = staticmethod(lambda s: list(s.encode()))
        ...     decode = staticmethod(lambda ids: bytes(ids).decode(errors="replace"))
        >>> cfg = jp.LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> params = jp.init(cfg, jax.random.key(0))
        >>> u = ReasoningUtility(Bytes(), ["2+2=", "3*3="], ["4", "9"], weights=(0.5, 0, 0.5),
        ...                      max_new_tokens=4)
        >>> 0.0 <= u.utility(params) <= 1.0
        True
        >>> u.evaluate_batch(params, {"mlp": jnp.ones((3, 1))}).shape     # 3 sub-models
        (3,)
    """

    def __init__(self, tokenizer, prompts: list[str], references: list[str], embed_fn=None,
                 weights=(1 / 3, 1 / 3, 1 / 3), max_new_tokens: int = 32, batch_size: int | None = None,
                 stop_token_ids=None, until=()):
        if isinstance(prompts, str) or isinstance(references, str):
            raise InvalidArgumentError("prompts and references must be lists of strings, not one string")
        prompts, references = list(prompts), list(references)
        if not prompts or len(prompts) != len(references):
            raise InvalidArgumentError(f"need as many references as prompts (>= 1), got {len(prompts)} prompts "
                                       f"and {len(references)} references")
        if not all(isinstance(t, str) for t in prompts + references):
            raise InvalidArgumentError("prompts and references must be strings")
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise InvalidArgumentError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        self.weights = _check_weights(weights, embed_fn)
        self.tokenizer, self.embed_fn = tokenizer, embed_fn
        self.prompts, self.references = prompts, references
        self.max_new_tokens, self.batch_size = int(max_new_tokens), batch_size
        stops = tokenizer.eos_token_id if stop_token_ids is None else stop_token_ids
        self.stop_token_ids = tuple(np.asarray(stop_array(stops)).tolist())
        self.prompt_ids = [list(tokenizer.encode(p)) for p in prompts]
        for p, ids in zip(prompts, self.prompt_ids):
            if not ids:
                raise InvalidArgumentError(f"prompt {p!r} tokenizes to no tokens")
        if isinstance(until, str):
            until = (until,)
        if not all(isinstance(u, str) and u for u in until):
            raise InvalidArgumentError(f"until must be non-empty strings, got {until!r}")
        self.until = tuple(until)
        self._ref_embeddings = None

    # -- generation ----------------------------------------------------------------

    def _decode(self, ids) -> str:
        text = self.tokenizer.decode(trim(ids, self.stop_token_ids))
        for u in self.until:
            text = text.split(u)[0]
        return text

    def generate(self, params: Params, gates=None) -> list[str]:
        """Greedy answer text to every prompt under one (gated) model."""
        ids = decode(params, self.prompt_ids, self.max_new_tokens, gates=gates, stop_token_ids=self.stop_token_ids)
        return [self._decode(row) for row in ids]

    def generate_batch(self, params: Params, stacked_gates, batch_size: int | None = None) -> list[list[str]]:
        """Answer texts [S][B] for S stacked sub-models."""
        bs = self.batch_size if batch_size is None else batch_size
        ids = decode_submodels(params, self.prompt_ids, self.max_new_tokens, stacked_gates, batch_size=bs,
                               stop_token_ids=self.stop_token_ids)
        return [[self._decode(row) for row in sub] for sub in ids]

    # -- scoring -------------------------------------------------------------------

    def metrics(self, generations: list[list[str]]) -> dict[str, np.ndarray]:
        """Per-sub-model means [S] of "f1", "cosine", "accuracy" and "utility" for texts [S][B].

        "cosine" is the clipped max(cos, 0) (NaN where a2 = 0: not computed).
        """
        a1, a2, a3 = self.weights
        n = len(self.references)
        if any(len(g) != n for g in generations):
            raise InvalidArgumentError(f"every sub-model needs {n} generations")
        f1 = np.array([[token_f1(g, r) for g, r in zip(gen, self.references)] for gen in generations]).reshape(-1, n)
        acc = np.array([[answer_accuracy(g, r) for g, r in zip(gen, self.references)]
                        for gen in generations]).reshape(-1, n)
        if a2 > 0:
            cos = np.clip(self._cosines([g for gen in generations for g in gen]).reshape(-1, n), 0.0, 1.0)
            u = a1 * f1 + a2 * cos + a3 * acc
            cos_mean = cos.mean(1)
        else:
            u = a1 * f1 + a3 * acc
            cos_mean = np.full(len(generations), np.nan)
        return {"f1": f1.mean(1), "cosine": cos_mean, "accuracy": acc.mean(1), "utility": u.mean(1)}

    def _cosines(self, flat_generations: list[str]) -> np.ndarray:
        if self._ref_embeddings is None:
            self._ref_embeddings = np.asarray(self.embed_fn(self.references), np.float64)
        ref = np.tile(self._ref_embeddings, (len(flat_generations) // len(self.references), 1))
        return cosine_rows(np.asarray(self.embed_fn(flat_generations), np.float64), ref)

    def score_texts(self, generations: list[str]) -> float:
        """The utility of one model's answer texts (one per prompt)."""
        return float(self.metrics([list(generations)])["utility"][0])

    def evaluate_batch(self, params: Params, stacked_gates, batch_size: int | None = None) -> np.ndarray:
        """Utility of each of S stacked sub-models: float64 [S] (higher = better)."""
        return self.metrics(self.generate_batch(params, stacked_gates, batch_size))["utility"]

    def utility(self, params: Params, gates=None) -> float:
        """Utility of one (gated) model."""
        return self.score_texts(self.generate(params, gates))

    __call__ = utility
