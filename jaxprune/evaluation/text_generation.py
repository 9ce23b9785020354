"""Greedy text generation with stop strings, for evaluation (lm-eval's `generate_until`, the
generation metrics), on the KV-cached engine `jaxprune.generation`.

Example:
    >>> import jax, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> ids, seconds = generate_ids(jp.init(cfg, jax.random.key(0)), [[1, 2, 3], [4]], 5)
    >>> [len(x) for x in ids]
    [5, 5]
"""

from __future__ import annotations

import time

import jax

from jaxprune.core.params import Params
from jaxprune.errors import InvalidArgumentError, check_int
from jaxprune.evaluation.scoring import _check_params, _check_tokenizer, _ids, eos_token_ids, model_max_length
from jaxprune.evaluation.scoring import prefix_token_id
from jaxprune.generation.engine import compile_decode, pad_prompts, stop_array
from jaxprune.generation.sampling import Sampler

_GREEDY = Sampler()


def generate_ids(params: Params, prompts, max_new_tokens: int, stop_token_ids=(), stop_fn=None,
                 batch_size: int = 8, max_length: int | None = None, gates=None,
                 chunk: int | None = None) -> tuple[list[list[int]], float]:
    """Greedy continuations of token-id prompts, stopping early: (new ids per prompt, decode seconds).

    Prompts are left-truncated to `max_length - max_new_tokens` tokens, sorted by length and
    decoded `batch_size` at a time with the KV-cached engine. A row stops at a stop token (not
    returned), at `max_new_tokens`, or once `stop_fn(new ids)` is true. Without `stop_fn` a batch
    decodes in one call; with it, `chunk` tokens per call (default 32) and `stop_fn` is checked
    between calls (each call prefills prompt + tokens so far).

    Returns:
      (list of generated id lists, seconds spent decoding, compilation excluded).
    """
    _check_params(params, gates)
    batch_size = check_int("batch_size", batch_size)
    L = model_max_length(params, max_length)
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new = int(max_new_tokens)
    if max_new >= L:
        raise InvalidArgumentError(f"max_new_tokens ({max_new}) must be below max_length ({L})")
    if chunk is not None and (isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1):
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
    stop_arr = stop_array(sorted(stops))
    n = max_new if stop_fn is None else min(int(chunk or 32), max_new)
    key = jax.random.key(0)   # greedy decoding draws nothing from it
    out: list[list[int]] = [[] for _ in ctxs]
    seconds = 0.0
    order = sorted(range(len(ctxs)), key=lambda i: -len(ctxs[i]))
    batch_size = min(batch_size, max(len(order), 1))
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        done = {i: False for i in batch}
        while not all(done.values()):
            seqs = [(ctxs[i] + out[i])[-(L - n):] for i in batch]
            tokens, lengths = pad_prompts(params, seqs, n, rows=batch_size)
            run = compile_decode(params, tokens, lengths, gates, stop_arr, key, _GREEDY, n)
            t0 = time.perf_counter()
            new = jax.device_get(run())
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
        >>> tok = jp.data.CharTokenizer(32)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> texts = greedy_until(jp.init(cfg, jax.random.key(0)), tok, ["hello"], 8, until=["b"])
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
