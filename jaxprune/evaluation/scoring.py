"""Scoring text under a jaxprune model the way lm-evaluation-harness scores it (no lm-eval needed).

- `encode_pair`: lm-eval's tokenization of a (context, continuation) request
  (HF causal models): trailing spaces of the context move to the continuation,
  context + continuation are encoded whole and split after the context's
  tokens; an empty context becomes the prefix token (BOS, else EOS).
- `score_pairs`: summed log-probability of each continuation and whether it is
  the greedy continuation (every token the argmax), input left-truncated to the
  last `max_length + 1` tokens as lm-eval's HF model does.
- `rolling_loglikelihoods`: a whole document's log-probability over disjoint
  windows of `max_length` predictions (lm-eval's `get_rolling_token_windows`).

Requests are sorted by length and run in batches whose shapes are padded to a
few buckets (rows to the batch size, lengths to 16, 24, 32, 48, 64, 96, ...),
so a whole evaluation compiles a handful of programs.

Example:
    >>> import jax, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> logprob, greedy = score_pairs(params, [([1, 2, 3], [4, 5]), ([7], [8])])
    >>> logprob.shape, greedy.dtype
    ((2,), dtype('bool'))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import InvalidArgumentError, check_int
from jaxprune.models import logits as model_logits
from jaxprune.models import gates as gates_lib
from jaxprune.core.buckets import length_bucket
from jaxprune.core.params import Params

DEFAULT_MAX_BATCH_TOKENS = 8192


# --------------------------------------------------------------------------- tokenization


def _ids(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, (int, np.integer)):
        return [int(x)]
    return [int(i) for i in x]


def eos_token_ids(tok) -> list[int]:
    """The tokenizer's EOS id(s) as a list (empty when it has none)."""
    return _ids(getattr(tok, "eos_token_id", None))


def prefix_token_id(tok) -> int:
    """lm-eval's prefix token for an empty context: BOS if the tokenizer has one, else EOS.

    Example:
        >>> class T: bos_token_id, eos_token_id = None, [2, 3]
        >>> prefix_token_id(T())
        2
    """
    ids = _ids(getattr(tok, "bos_token_id", None)) or eos_token_ids(tok)
    if not ids:
        raise InvalidArgumentError("the tokenizer has neither a BOS nor an EOS token id; "
                                   "pass prefix_token_id explicitly")
    return ids[0]


def _check_tokenizer(tok, decode: bool = True):
    if not callable(getattr(tok, "encode", None)) or (decode and not callable(getattr(tok, "decode", None))):
        need = "encode(str) -> ids and decode(ids) -> str" if decode else "encode(str) -> ids"
        raise InvalidArgumentError(f"tokenizer must have {need}, got {type(tok).__name__}")
    return tok


def encode_pair(tok, context: str, continuation: str, prefix: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids (context, continuation) of a loglikelihood request, as lm-eval's HF model makes them.

    Trailing whitespace of `context` moves to the continuation; the two are
    encoded together and split after the context's own tokens. An empty
    context becomes `[prefix]` (default `prefix_token_id(tok)`) unless the
    continuation itself starts with that token.

    Example:
        >>> from jaxprune.data import CharTokenizer
        >>> tok = CharTokenizer()                        # one token per character: its code point
        >>> encode_pair(tok, "ab ", "c")
        ([97, 98], [32, 99])
        >>> encode_pair(tok, "", "c")
        ([1], [99])
    """
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise InvalidArgumentError(f"context and continuation must be strings, got "
                                   f"{type(context).__name__} and {type(continuation).__name__}")
    if context == "":
        cont = list(tok.encode(continuation))
        p = prefix_token_id(tok) if prefix is None else int(prefix)
        if cont and cont[0] == p:
            return cont[:1], cont[1:]
        return [p], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx = list(tok.encode(context)) if context else []
    whole = list(tok.encode(context + continuation))
    cont = whole[len(ctx):]
    if not ctx:   # a whitespace-only context: condition on the prefix token instead
        ctx = [prefix_token_id(tok) if prefix is None else int(prefix)]
    return ctx, cont


# --------------------------------------------------------------------------- shapes


def _check_params(params, gates):
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"expected jaxprune Params (from jaxprune.load), got {type(params).__name__}")
    gates_lib.check_gates(gates)


def model_max_length(params: Params, max_length: int | None = None) -> int:
    """`max_length` checked against the model's `max_position_embeddings` (its default)."""
    limit = getattr(params.config, "max_position_embeddings", None)
    if max_length is None:
        return int(limit) if limit else 2048
    if int(max_length) != max_length or max_length < 2:
        raise InvalidArgumentError(f"max_length must be an integer >= 2, got {max_length!r}")
    if limit and max_length > limit:
        raise InvalidArgumentError(f"max_length={max_length} exceeds the model's max_position_embeddings ({limit})")
    return int(max_length)


# --------------------------------------------------------------------------- loglikelihood


@jax.jit
def _token_logprobs(params, inp, tgt, gates):
    """log p(tgt[b, t] | inp[b, :t+1]) float32 [B, T] and whether tgt is the argmax [B, T]."""
    logits = model_logits(params, inp, gates).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    return picked - lse, jnp.argmax(logits, axis=-1) == tgt


def score_pairs(params: Params, pairs, batch_size: int = 8, max_length: int | None = None, gates=None,
                max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability of each continuation given its context, and whether it is greedy.

    Args:
      params: model params (pruned or not).
      pairs: list of (context ids, continuation ids); a context needs >= 1 token,
        a continuation 1 to `max_length` tokens (an empty one scores (0.0, True)).
      batch_size: most sequences per compiled forward.
      max_length: model context; context + continuation is left-truncated to its
        last `max_length + 1` tokens (default: `max_position_embeddings`).
      gates: optional structured gates.
      max_batch_tokens: rows per batch shrink so rows x padded length stays under this.

    Returns:
      (float64 [n] summed log-probabilities, bool [n] every continuation token is the argmax).

    Example:
        >>> import jax, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> lp, greedy = score_pairs(jp.init(cfg, jax.random.key(0)), [([1, 2], [3])])
        >>> bool(lp[0] < 0)
        True
    """
    _check_params(params, gates)
    batch_size = check_int("batch_size", batch_size)
    L = model_max_length(params, max_length)
    vocab = params.config.vocab_size
    rows = []                                     # (input ids, target ids, n continuation tokens)
    for i, pair in enumerate(pairs):
        try:
            ctx, cont = pair
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"pair {i} must be (context ids, continuation ids), got {pair!r}") from None
        ctx, cont = _ids(ctx), _ids(cont)
        if not ctx:
            raise InvalidArgumentError(f"pair {i}: the context needs at least one token (use the BOS/EOS token)")
        if len(cont) > L:
            raise InvalidArgumentError(f"pair {i}: continuation of {len(cont)} tokens exceeds max_length={L}")
        seq = (ctx + cont)[-(L + 1):]
        if min(seq) < 0 or max(seq) >= vocab:
            raise InvalidArgumentError(f"pair {i}: token ids must lie in [0, {vocab})")
        rows.append((seq[:-1], seq[1:], len(cont)))
    n = len(rows)
    logprob, greedy = np.zeros(n, np.float64), np.ones(n, bool)
    order = sorted((i for i in range(n) if rows[i][2] > 0), key=lambda i: -len(rows[i][0]))
    s = 0
    while s < len(order):
        T = length_bucket(len(rows[order[s]][0]), L)
        B = max(1, min(batch_size, int(max_batch_tokens) // T, len(order)))
        chunk = order[s:s + B]
        inp, tgt = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        for r, i in enumerate(chunk):
            x, y, _ = rows[i]
            inp[r, :len(x)], tgt[r, :len(y)] = x, y
        lp, gr = _token_logprobs(params, jnp.asarray(inp), jnp.asarray(tgt), gates)
        lp, gr = np.asarray(lp, np.float64), np.asarray(gr)
        for r, i in enumerate(chunk):
            x, _, k = rows[i]
            logprob[i] = lp[r, len(x) - k:len(x)].sum()
            greedy[i] = bool(gr[r, len(x) - k:len(x)].all())
        s += len(chunk)
    return logprob, greedy


def loglikelihoods(params: Params, tok, requests, batch_size: int = 8, max_length: int | None = None, gates=None,
                   max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> list[tuple[float, bool]]:
    """(log-probability, is greedy) of each (context, continuation) string pair, tokenized by `encode_pair`.

    Example:
        >>> import jax, jaxprune as jp
        >>> tok = jp.data.CharTokenizer(32)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> out = loglikelihoods(jp.init(cfg, jax.random.key(0)), tok, [("ab", " c"), ("", "d")])
        >>> [type(v).__name__ for v in out[0]]
        ['float', 'bool']
    """
    _check_tokenizer(tok, decode=False)
    pairs = []
    for i, req in enumerate(requests):
        try:
            context, continuation = req
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"request {i} must be (context, continuation), got {req!r}") from None
        pairs.append(encode_pair(tok, context, continuation))
    lp, gr = score_pairs(params, pairs, batch_size, max_length, gates, max_batch_tokens)
    return [(float(a), bool(b)) for a, b in zip(lp, gr)]


def rolling_windows(ids, prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, prediction) windows covering `ids` once, as lm-eval builds them.

    The first window conditions on `prefix`; each window predicts up to
    `max_length` tokens with the preceding ones as context (lm-eval's
    `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`).

    Example:
        >>> rolling_windows(list(range(10, 20)), prefix=0, max_length=4)
        [([0], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]), ([15, 16, 17], [18, 19])]
    """
    ids, L = _ids(ids), int(max_length)
    if L < 1:
        raise InvalidArgumentError(f"max_length must be >= 1, got {max_length!r}")
    out = []
    if not ids:
        return out
    first = min(L, len(ids))
    out.append(([int(prefix)], ids[:first]))
    done = first
    while done < len(ids):
        k = min(len(ids) - done, L)
        end = done + k
        window = ids[max(end - L - 1, 0):end - 1]
        out.append((window[:len(window) - (k - 1)], ids[end - k:end]))
        done = end
    return out


def rolling_loglikelihoods(params: Params, tok, texts, batch_size: int = 8, max_length: int | None = None,
                           gates=None, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> list[float]:
    """Log-probability of each whole text: every token predicted once, the first after the prefix token.

    Example:
        >>> import jax, jaxprune as jp
        >>> tok = jp.data.CharTokenizer(32)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> len(rolling_loglikelihoods(jp.init(cfg, jax.random.key(0)), tok, ["abc", "de"], max_length=2))
        2
    """
    _check_tokenizer(tok, decode=False)
    _check_params(params, gates)
    L = model_max_length(params, max_length)
    p = prefix_token_id(tok)
    pairs, owner = [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text {i} must be a string, got {type(text).__name__}")
        for w in rolling_windows(tok.encode(text), p, L):
            pairs.append(w)
            owner.append(i)
    lp, _ = score_pairs(params, pairs, batch_size, L, gates, max_batch_tokens)
    totals = np.zeros(len(texts), np.float64)
    np.add.at(totals, np.asarray(owner, np.int64), lp)
    return [float(t) for t in totals]


