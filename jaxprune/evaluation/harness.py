"""Standard evaluation: a jaxprune model inside lm-evaluation-harness.

`JaxpruneLM(params, tokenizer)` is an `lm_eval.api.model.LM`, so any
lm-evaluation-harness task (multiple choice, loglikelihood, rolling
loglikelihood, generation) runs on a dense, pruned or gated jaxprune model::

    import lm_eval, jaxprune as jp
    from jaxprune.evaluation.harness import JaxpruneLM
    lm = JaxpruneLM(jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m"), batch_size=8, max_length=1024)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

lm-eval is imported only when `JaxpruneLM` is first used (`pip install 'jaxprune[eval]'`).
The scoring and decoding underneath need no lm-eval and are used by
`jaxprune.evaluation.tasks` and `jaxprune.evaluation.generation_metrics` as well:

- `encode_pair`: lm-eval's tokenization of a (context, continuation) request
  (HF causal models): trailing spaces of the context move to the continuation,
  context + continuation are encoded whole and split after the context's
  tokens; an empty context becomes the prefix token (BOS, else EOS).
- `score_pairs`: summed log-probability of each continuation and whether it is
  the greedy continuation (every token the argmax), input left-truncated to the
  last `max_length + 1` tokens as lm-eval's HF model does.
- `rolling_loglikelihoods`: a whole document's log-probability over disjoint
  windows of `max_length` predictions (lm-eval's `get_rolling_token_windows`).
- `greedy_until`, `generate_ids`: batched greedy decoding with stop strings.

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

import collections
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.errors import InvalidArgumentError, check_int
from jaxprune.models import logits as model_logits
from jaxprune.models import gates as gates_lib
from jaxprune.core.params import Params
from jaxprune.evaluation.reasoning import _decode_core

log = logging.getLogger(__name__)

EVAL_INSTALL = "pip install 'jaxprune[eval]'"
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
        >>> class Chars:                                   # one token per character
        ...     bos_token_id, eos_token_id = 1, 2
        ...     def encode(self, s): return [ord(c) for c in s]
        >>> encode_pair(Chars(), "ab ", "c")
        ([97, 98], [32, 99])
        >>> encode_pair(Chars(), "", "c")
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


def length_bucket(n: int, cap: int | None = None) -> int:
    """The padded length for `n` tokens: the first of 16, 24, 32, 48, 64, 96, ... >= n, at most `cap`.

    Example:
        >>> [length_bucket(n) for n in (1, 17, 33, 100)], length_bucket(100, cap=80)
        ([16, 24, 48, 128], 100)
    """
    b = 16
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return max(n, min(b, cap)) if cap is not None else b


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
        >>> class Chars:
        ...     bos_token_id, eos_token_id = 1, 2
        ...     def encode(self, s): return [ord(c) % 32 for c in s]
        ...     def decode(self, ids): return "".join(chr(97 + i % 26) for i in ids)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> out = loglikelihoods(jp.init(cfg, jax.random.key(0)), Chars(), [("ab", " c"), ("", "d")])
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
        >>> class Chars:
        ...     bos_token_id, eos_token_id = 1, 2
        ...     def encode(self, s): return [ord(c) % 32 for c in s]
        ...     def decode(self, ids): return ""
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> len(rolling_loglikelihoods(jp.init(cfg, jax.random.key(0)), Chars(), ["abc", "de"], max_length=2))
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


# --------------------------------------------------------------------------- generation

_decode_jit = jax.jit(_decode_core, static_argnames=("max_new_tokens",))


def _decode_fn(params, buf, lengths, stop, gates, n: int):
    """The greedy decoder compiled ahead of time for these shapes, so calls can be timed without
    compilation. JAX caches the lowering and the executable of the one module-level jitted
    decoder, so shapes seen before compile nothing."""
    return _decode_jit.lower(params, buf, lengths, stop, gates, max_new_tokens=n).compile()


def generate_ids(params: Params, prompts, max_new_tokens: int, stop_token_ids=(), stop_fn=None,
                 batch_size: int = 8, max_length: int | None = None, gates=None,
                 chunk: int = 32) -> tuple[list[list[int]], float]:
    """Greedy continuations of token-id prompts, stopping early: (new ids per prompt, decode seconds).

    Prompts are left-truncated to `max_length - max_new_tokens` tokens, sorted
    by length and decoded `batch_size` at a time, `chunk` tokens per compiled
    call (no KV cache: each step re-runs the whole padded buffer). A row stops
    at a stop token (not returned), at `max_new_tokens`, or once
    `stop_fn(new ids)` is true; a batch stops when every row has.

    Returns:
      (list of generated id lists, seconds spent decoding, compilation excluded).

    Example:
        >>> import jax, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> ids, seconds = generate_ids(jp.init(cfg, jax.random.key(0)), [[1, 2, 3], [4]], 5)
        >>> [len(x) for x in ids]
        [5, 5]
    """
    _check_params(params, gates)
    batch_size = check_int("batch_size", batch_size)
    L = model_max_length(params, max_length)
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new = int(max_new_tokens)
    if max_new >= L:
        raise InvalidArgumentError(f"max_new_tokens ({max_new}) must be below max_length ({L})")
    if int(chunk) != chunk or chunk < 1:
        raise InvalidArgumentError(f"chunk must be an integer >= 1, got {chunk!r}")
    vocab = params.config.vocab_size
    ctxs = []
    for i, p in enumerate(prompts):
        ids = _ids(p)
        if not ids:
            raise InvalidArgumentError(f"prompt {i} is empty (greedy decoding needs at least one token)")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidArgumentError(f"prompt {i} must hold token ids in [0, {vocab})")
        ctxs.append(ids[-(L - max_new):])
    stops = set(_ids(stop_token_ids))
    stop_arr = jnp.asarray(sorted(stops), jnp.int32).reshape(-1)
    n = min(int(chunk), max_new)
    out: list[list[int]] = [[] for _ in ctxs]
    seconds = 0.0
    order = sorted(range(len(ctxs)), key=lambda i: -len(ctxs[i]))
    batch_size = min(batch_size, max(len(order), 1))
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        done = {i: False for i in batch}
        while not all(done.values()):
            seqs = [ctxs[i] + out[i] for i in batch]
            P = max(len(q) for q in seqs)
            T = min(length_bucket(P + n), L)
            buf = np.zeros((batch_size, T), np.int32)
            lengths = np.ones(batch_size, np.int32)
            for r, q in enumerate(seqs):
                buf[r, :len(q)], lengths[r] = q, len(q)
            buf, lengths = jnp.asarray(buf), jnp.asarray(lengths)
            fn = _decode_fn(params, buf, lengths, stop_arr, gates, n)
            t0 = time.perf_counter()
            new = np.asarray(fn(params, buf, lengths, stop_arr, gates))
            seconds += time.perf_counter() - t0
            for r, i in enumerate(batch):
                if done[i]:
                    continue
                for tkn in new[r, :max_new - len(out[i])].tolist():
                    if tkn < 0 or tkn in stops:
                        done[i] = True
                        break
                    out[i].append(tkn)
                if len(out[i]) >= max_new or (stop_fn is not None and stop_fn(out[i])):
                    done[i] = True
    return out, seconds


def _cut(text: str, until) -> str:
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def greedy_until(params: Params, tok, prompts, max_new_tokens: int, until=(), batch_size: int = 8,
                 max_length: int | None = None, gates=None, stop_token_ids=None, chunk: int = 32) -> list[str]:
    """Greedy continuation text of each prompt string, cut before the first `until` string.

    Decoding also stops at the tokenizer's EOS (or `stop_token_ids`) and after
    `max_new_tokens` tokens; the text is cut as lm-eval cuts it (before each
    stop string in turn).

    Example:
        >>> import jax, jaxprune as jp
        >>> class Chars:
        ...     bos_token_id, eos_token_id = 1, 2
        ...     def encode(self, s): return [ord(c) % 32 for c in s]
        ...     def decode(self, ids): return "".join("ab"[i % 2] for i in ids)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> texts = greedy_until(jp.init(cfg, jax.random.key(0)), Chars(), ["hello"], 8, until=["b"])
        >>> "b" in texts[0]
        False
    """
    _check_tokenizer(tok)
    if isinstance(until, str):
        until = [until]
    until = [u for u in (until or []) if isinstance(u, str) and u]
    stops = eos_token_ids(tok) if stop_token_ids is None else _ids(stop_token_ids)
    ids = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidArgumentError(f"prompt {i} must be a string, got {type(p).__name__}")
        e = list(tok.encode(p))
        ids.append(e if e else [prefix_token_id(tok)])
    stop_fn = (lambda g: any(u in tok.decode(g) for u in until)) if until else None
    gen, _ = generate_ids(params, ids, max_new_tokens, stops, stop_fn, batch_size, max_length, gates, chunk)
    return [_cut(tok.decode(g), until) for g in gen]


# --------------------------------------------------------------------------- the lm-eval model

_LM_CLASS = None


def _require_lm_eval():
    try:
        from lm_eval.api import model as lm_model
        from lm_eval.api import registry
    except ImportError as e:
        raise ImportError(f"jaxprune.evaluation.harness.JaxpruneLM needs lm-evaluation-harness ({e}): "
                          f"{EVAL_INSTALL}") from None
    return lm_model.LM, registry


def _lm_class():
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    LM, _ = _require_lm_eval()

    class JaxpruneLM(LM):
        """lm-evaluation-harness model backed by a jaxprune model (greedy, batched, jit-compiled).

        Args:
          params: `Params`, or a source for `jaxprune.load` (name, directory, .gguf).
          tokenizer: `encode`/`decode`/`eos_token_id`/`bos_token_id`, e.g.
            `jaxprune.tokenizer(src)`; default: the tokenizer of `params` when it is a source.
          batch_size: most sequences per compiled forward.
          max_length: model context for scoring and generation (default: the
            model's `max_position_embeddings`); longer inputs are left-truncated.
          gates: optional structured gates (a gated sub-model).
          max_gen_toks: default generation length when a task sets none.
          max_batch_tokens: rows per batch shrink so rows x padded length stays under this.
          pretrained: same as a source in `params` (for `model_args="pretrained=..."`).
          device, max_batch_size: accepted for lm-eval's string-model path, and ignored.

        After `register_with_lm_eval()`, lm-eval also finds it by name:
        `simple_evaluate(model="jaxprune", model_args="pretrained=smollm2-135m")`.

        Example:
            >>> import lm_eval, jaxprune as jp                                 # doctest: +SKIP
            >>> lm = JaxpruneLM.from_pretrained("smollm2-135m", max_length=1024)  # doctest: +SKIP
            >>> lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"], limit=100)  # doctest: +SKIP
        """

        def __init__(self, params=None, tokenizer=None, batch_size: int = 8, max_length: int | None = None,
                     gates=None, max_gen_toks: int = 256, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                     pretrained=None, device=None, max_batch_size=None):
            super().__init__()
            if params is None:
                params = pretrained
            if params is None:
                raise InvalidArgumentError("JaxpruneLM needs params (jaxprune Params or a model source)")
            if not isinstance(params, Params):
                from jaxprune.io.resolve import load, tokenizer as load_tokenizer
                source = params
                params = load(source)
                if tokenizer is None:
                    tokenizer = load_tokenizer(source)
            elif isinstance(tokenizer, str):
                from jaxprune.io.resolve import tokenizer as load_tokenizer
                tokenizer = load_tokenizer(tokenizer)
            if tokenizer is None:
                raise InvalidArgumentError("JaxpruneLM needs a tokenizer (e.g. jaxprune.tokenizer(source))")
            _check_params(params, gates)
            if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
                raise InvalidArgumentError("batch_size='auto' is not supported; pass an integer")
            self.params, self.tokenizer, self.gates = params, _check_tokenizer(tokenizer), gates
            self.batch_size = check_int("batch_size", int(batch_size) if isinstance(batch_size, str) else batch_size)
            self.max_length = model_max_length(params, max_length)
            self._max_gen_toks = check_int("max_gen_toks", max_gen_toks)
            self.max_batch_tokens = int(max_batch_tokens)

        @classmethod
        def from_pretrained(cls, source, **kwargs):
            """Load `source` (built-in name, HF directory, .gguf) and its tokenizer, then wrap them."""
            return cls(source, **kwargs)

        # -- properties lm-eval reads -------------------------------------------------

        @property
        def eot_token_id(self) -> int:
            ids = eos_token_ids(self.tokenizer)
            return ids[0] if ids else prefix_token_id(self.tokenizer)

        @property
        def prefix_token_id(self) -> int:
            return prefix_token_id(self.tokenizer)

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "source", type(self.tokenizer).__name__)).replace("/", "__")

        def chat_template(self, chat_template=False):
            return None

        def get_model_info(self) -> dict:
            n = sum(int(np.size(x)) for x in jax.tree.leaves(self.params))
            return {"model_num_parameters": n, "model_dtype": str(jax.tree.leaves(self.params)[0].dtype),
                    "model_arch": self.params.config.arch}

        def tok_encode(self, string: str, **kwargs) -> list[int]:
            return list(self.tokenizer.encode(string))

        def tok_decode(self, ids, **kwargs) -> str:
            return self.tokenizer.decode(_ids(ids))

        # -- the three request types --------------------------------------------------

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            """(log p(continuation | context), continuation is greedy) per request (args: context, continuation)."""
            args = [req.args for req in requests]
            out = loglikelihoods(self.params, self.tokenizer, args, self.batch_size, self.max_length, self.gates,
                                 self.max_batch_tokens)
            for a, r in zip(args, out):
                self.cache_hook.add_partial("loglikelihood", a, r)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Log-probability of each whole string (args: (string,)), over disjoint windows of max_length."""
            texts = [req.args[0] for req in requests]
            out = rolling_loglikelihoods(self.params, self.tokenizer, texts, self.batch_size, self.max_length,
                                         self.gates, self.max_batch_tokens)
            for t, r in zip(texts, out):
                self.cache_hook.add_partial("loglikelihood_rolling", (t,), r)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy generation per request (args: context, gen_kwargs with `until`, `max_gen_toks`)."""
            groups: dict = collections.defaultdict(list)
            for k, req in enumerate(requests):
                context, gen_kwargs = req.args
                until, max_gen = self._gen_settings(gen_kwargs)
                groups[(tuple(until), max_gen)].append(k)
            res: list = [None] * len(requests)
            eos_text = [self.tok_decode([i]) for i in eos_token_ids(self.tokenizer)]
            for (until, max_gen), idx in groups.items():
                prompts = [requests[k].args[0] for k in idx]
                stops = list(until) + [e for e in eos_text if e and e not in until]
                texts = greedy_until(self.params, self.tokenizer, prompts, max_gen, stops, self.batch_size,
                                     self.max_length, self.gates)
                for k, text in zip(idx, texts):
                    res[k] = text
                    self.cache_hook.add_partial("generate_until", requests[k].args, text)
            return res

        def _gen_settings(self, gen_kwargs) -> tuple[list[str], int]:
            if not isinstance(gen_kwargs, (dict, type(None))):
                raise InvalidArgumentError(f"gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
            kw = dict(gen_kwargs or {})
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                log.warning("JaxpruneLM decodes greedily; ignoring do_sample/temperature in %s", kw)
            until = kw.get("until")
            until = [until] if isinstance(until, str) else list(until or [])
            max_gen = self._max_gen_toks
            for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
                if kw.get(key) is not None:
                    max_gen = int(kw[key])
                    break
            if max_gen < 1 or max_gen >= self.max_length:
                raise InvalidArgumentError(f"max_gen_toks={max_gen} must lie in [1, max_length={self.max_length})")
            return until, max_gen

    JaxpruneLM.__qualname__ = "JaxpruneLM"
    JaxpruneLM.__module__ = __name__
    _LM_CLASS = JaxpruneLM
    return JaxpruneLM


def register_with_lm_eval(name: str = "jaxprune"):
    """Register `JaxpruneLM` in lm-eval's model registry under `name`, so lm-eval can build it from
    a string: ``lm_eval.simple_evaluate(model="jaxprune", model_args="pretrained=smollm2-135m")``.

    Nothing registers by itself: importing jaxprune or building a `JaxpruneLM` leaves lm-eval's
    registry alone. Registering again under the same name is a no-op. Returns the class.
    (Passing a `JaxpruneLM` instance as ``model=`` needs no registration.)

    Example:
        >>> register_with_lm_eval()                                        # doctest: +SKIP
        <class 'jaxprune.evaluation.harness.JaxpruneLM'>
    """
    cls = _lm_class()
    _, registry = _require_lm_eval()
    try:
        if registry.get_model(name) is cls:
            return cls
    except Exception:                            # not registered yet (lm-eval raises on unknown names)
        pass
    registry.register_model(name)(cls)
    return cls


def lm_eval_model(params, tokenizer=None, **kwargs):
    """A `JaxpruneLM` (an `lm_eval.api.model.LM`) for `params` (or a model source) and `tokenizer`.

    Example:
        >>> lm = lm_eval_model("smollm2-135m", max_length=1024)   # doctest: +SKIP
    """
    return _lm_class()(params, tokenizer, **kwargs)


def __getattr__(name):
    if name == "JaxpruneLM":
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
