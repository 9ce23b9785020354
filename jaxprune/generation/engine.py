"""One decoding engine: prefill the prompts, then decode with a fixed-size KV cache updated in
place inside one compiled loop.

- Prompts of different lengths share a batch: they are padded on the right, each row's tokens
  are written at its own positions, and a row only ever attends to its own earlier tokens.
- Greedy or sampled (`Sampler`: temperature, top-k, top-p) from an explicit `jax.random` key.
- A row stops at a stop token (kept in the output; every later slot is -1); the loop ends
  early once every row has stopped.
- Every family (sliding-window layers included) and compacted models whose layers differ in
  width or lack attention (`kv_cache`).
- `decode_submodels` vmaps the whole loop over stacked structured gates: S sub-models x B
  prompts in one compiled call, `batch_size` sub-models at a time to bound memory.

Shapes are bucketed (prompt lengths to 16, 24, 32, 48, ...), so a workload compiles a handful
of programs; the compiled loop is a module-level `jax.jit`, reused across calls.

Example:
    >>> import jax, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=2, num_attention_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> decode(params, [[1, 2, 3], [4]], max_new_tokens=5).shape
    (2, 5)
    >>> out = generate(params, [[1, 2, 3]], max_new_tokens=4, temperature=0.8, key=jax.random.key(1))
    >>> len(out[0])
    4
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxprune.core.buckets import length_bucket
from jaxprune.core.params import Params
from jaxprune.errors import InvalidArgumentError, check_int
from jaxprune.generation.kv_cache import init_cache
from jaxprune.generation.sampling import Sampler, sample
from jaxprune.models import embed, layer, require_layer_list, unembed
from jaxprune.models import gates as gates_lib


def _run_layers(params, x, ctx, gates, cache, pos):
    new = []
    for i, c in enumerate(cache):
        if c is None:
            x = layer(params, i, x, ctx, gates)
        else:
            x, c = layer(params, i, x, ctx, gates, cache={**c, "pos": pos})
            c = {"k": c["k"], "v": c["v"]}
        new.append(c)
    return x, new


def decode_core(params: Params, tokens, lengths, gates, stop_ids, key, sampler: Sampler,
                max_new_tokens: int, with_logits: bool = False, on_token=None):
    """The loop, for use inside your own `jit`/`vmap`: tokens int32 [B, P] right-padded,
    lengths int32 [B] -> new tokens int32 [B, N] (-1 after a row's stop token), and the
    float32 logits [B, N, V] each token was chosen from when `with_logits`."""
    B, P = tokens.shape
    N = max_new_tokens
    rows = jnp.arange(B)
    cache = init_cache(params, B, P + N)
    x, ctx = embed(params, tokens, gates)
    x, cache = _run_layers(params, x, ctx, gates, cache, jnp.zeros((B,), jnp.int32))
    logits = unembed(params, x[rows, lengths - 1][:, None], gates)[:, 0]
    first = sample(logits, jax.random.fold_in(key, 0), sampler)
    out = jnp.full((B, N), -1, jnp.int32).at[:, 0].set(first)
    done = (first[:, None] == stop_ids).any(-1)
    logit_buf = jnp.zeros((B, N, logits.shape[-1]), jnp.float32).at[:, 0].set(logits) if with_logits else None
    if on_token is not None:
        io_callback(on_token, None, jnp.int32(0), first, ordered=True)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < N) & ~jnp.all(done)

    def body(state):
        i, prev, cache, out, done, logit_buf = state
        pos = lengths + i - 1                     # where the previous token sits
        x, ctx = embed(params, jnp.maximum(prev, 0)[:, None], gates, positions=pos[:, None])
        x, cache = _run_layers(params, x, ctx, gates, cache, pos)
        logits = unembed(params, x, gates)[:, 0]
        nxt = jnp.where(done, -1, sample(logits, jax.random.fold_in(key, i), sampler))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        if with_logits:
            logit_buf = jax.lax.dynamic_update_slice(logit_buf, logits[:, None], (0, i, 0))
        if on_token is not None:
            io_callback(on_token, None, i, nxt, ordered=True)
        done = done | (nxt[:, None] == stop_ids).any(-1)
        return i + 1, nxt, cache, out, done, logit_buf

    state = (jnp.int32(1), first, cache, out, done, logit_buf)
    _, _, _, out, _, logit_buf = jax.lax.while_loop(cond, body, state)
    return (out, logit_buf) if with_logits else out


_STATIC = ("sampler", "max_new_tokens", "with_logits", "on_token")
_decode_jit = jax.jit(decode_core, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC + ("batch_size",))
def _decode_submodels_jit(params, tokens, lengths, stacked_gates, stop_ids, key, sampler, max_new_tokens,
                          with_logits=False, on_token=None, batch_size=None):
    one = lambda g: decode_core(params, tokens, lengths, g, stop_ids, key, sampler, max_new_tokens, with_logits)
    if batch_size is None:
        return jax.vmap(one)(stacked_gates)
    return jax.lax.map(one, stacked_gates, batch_size=batch_size)   # vmapped chunks of batch_size


def compile_decode(params, tokens, lengths, gates, stop_ids, key, sampler: Sampler, max_new_tokens: int):
    """The loop compiled ahead of time for these inputs, as a zero-argument callable, so a caller
    can time decoding without compilation (JAX caches the executable: shapes seen before compile
    nothing)."""
    exe = _decode_jit.lower(params, tokens, lengths, gates, stop_ids, key, sampler=sampler,
                            max_new_tokens=max_new_tokens).compile()
    return lambda: exe(params, tokens, lengths, gates, stop_ids, key)


# --------------------------------------------------------------------------- inputs


def _check_params(params):
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"expected jaxprune Params (from jaxprune.load), got {type(params).__name__}")
    require_layer_list(params, "decoding")


def stop_array(stop_token_ids) -> jnp.ndarray:
    """Stop ids as int32 [n] (None or () -> none)."""
    if stop_token_ids is None:
        ids = []
    elif isinstance(stop_token_ids, (int, np.integer)):
        ids = [int(stop_token_ids)]
    else:
        ids = [int(i) for i in stop_token_ids]
    return jnp.asarray(sorted(set(ids)), jnp.int32).reshape(-1)


def check_max_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return int(max_new_tokens)


def pad_prompts(params: Params, prompts, max_new_tokens: int, rows: int | None = None):
    """Validate token-id prompts and pad them on the right into int32 [rows, P] (P a length
    bucket) with lengths [rows]; extra rows (up to `rows`) are one-token dummies."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or len(prompts) == 0:
        raise InvalidArgumentError("prompts must be a non-empty list of token-id lists")
    vocab = params.config.vocab_size
    seqs = []
    for i, p in enumerate(prompts):
        r = np.asarray(p).reshape(-1)
        if r.size == 0:
            raise InvalidArgumentError(f"prompt {i} is empty (decoding needs at least one token)")
        if not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= vocab:
            raise InvalidArgumentError(f"prompt {i} must hold integer token ids in [0, {vocab})")
        seqs.append(r)
    longest = max(r.size for r in seqs)
    limit = getattr(params.config, "max_position_embeddings", None)
    if limit is not None and longest + max_new_tokens > limit:
        raise InvalidArgumentError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) = "
                                   f"{longest + max_new_tokens} exceeds the model's max_position_embeddings ({limit})")
    P = length_bucket(longest, None if limit is None else limit - max_new_tokens)
    n = max(len(seqs), rows or 0)
    buf = np.zeros((n, P), np.int32)
    lengths = np.ones(n, np.int32)
    for i, r in enumerate(seqs):
        buf[i, :r.size], lengths[i] = r, r.size
    return jnp.asarray(buf), jnp.asarray(lengths)


def _sampler_and_key(key, temperature, top_k, top_p):
    sampler = Sampler(temperature, top_k, top_p)
    if key is None:
        if not sampler.greedy:
            raise InvalidArgumentError("sampling (temperature > 0) needs an explicit key=jax.random.key(seed)")
        key = jax.random.key(0)   # unused by greedy decoding
    return sampler, key


# --------------------------------------------------------------------------- public


def decode(params: Params, prompts, max_new_tokens: int, *, gates=None, stop_token_ids=(), key=None,
           temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           return_logits: bool = False, on_token=None):
    """Continuations of token-id prompts as an array: int32 [B, N], -1 after a row's stop
    token (the stop token itself is kept); with `return_logits` also float32 [B, N, V], the
    logits each token was chosen from.

    on_token: optional ``f(step, ids [B])`` called from inside the loop as tokens are made.

    Example:
        >>> import jax, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> tokens, logits = decode(jp.init(cfg, jax.random.key(0)), [[5, 6]], 3, return_logits=True)
        >>> tokens.shape, logits.shape
        ((1, 3), (1, 3, 32))
    """
    _check_params(params)
    gates_lib.check_gates(gates)
    N = check_max_new_tokens(max_new_tokens)
    sampler, key = _sampler_and_key(key, temperature, top_k, top_p)
    tokens, lengths = pad_prompts(params, prompts, N)
    res = _decode_jit(params, tokens, lengths, gates, stop_array(stop_token_ids), key, sampler=sampler,
                      max_new_tokens=N, with_logits=bool(return_logits), on_token=on_token)
    if return_logits:
        return np.asarray(res[0]), np.asarray(res[1])
    return np.asarray(res)


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


def decode_submodels(params: Params, prompts, max_new_tokens: int, stacked_gates, *, batch_size: int | None = None,
                     stop_token_ids=(), key=None, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float = 1.0, return_logits: bool = False):
    """`decode` for S sub-models at once: int32 [S, B, N] (and logits [S, B, N, V]).

    `stacked_gates` is a gates dict whose leaves have a leading sub-model axis S; sub-models
    are vmapped `batch_size` at a time (`jax.lax.map`; None or >= S: all together).

    Example:
        >>> import jax, jax.numpy as jnp, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> g = {"heads": jnp.ones((3, 1, 2)).at[1, 0, 0].set(0.0)}   # 3 sub-models
        >>> decode_submodels(jp.init(cfg, jax.random.key(0)), [[1, 2], [3]], 4, g, batch_size=2).shape
        (3, 2, 4)
    """
    _check_params(params)
    N = check_max_new_tokens(max_new_tokens)
    S = num_submodels(stacked_gates)
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise InvalidArgumentError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    bs = None if batch_size is None or batch_size >= S else int(batch_size)
    sampler, key = _sampler_and_key(key, temperature, top_k, top_p)
    tokens, lengths = pad_prompts(params, prompts, N)
    res = _decode_submodels_jit(params, tokens, lengths, stacked_gates, stop_array(stop_token_ids), key,
                                sampler=sampler, max_new_tokens=N, with_logits=bool(return_logits), batch_size=bs)
    if return_logits:
        return np.asarray(res[0]), np.asarray(res[1])
    return np.asarray(res)


def trim(ids, stop_token_ids=()) -> list[int]:
    """Generated ids up to (excluding) the first stop token, with the -1 fill dropped."""
    stops = set(np.asarray(stop_array(stop_token_ids)).tolist())
    out = []
    for i in np.asarray(ids).tolist():
        if i < 0 or i in stops:
            break
        out.append(i)
    return out


def _eos_ids(tokenizer) -> list[int]:
    e = getattr(tokenizer, "eos_token_id", None)
    if e is None:
        return []
    return [int(i) for i in (e if isinstance(e, (list, tuple)) else [e])]


def generate(params: Params, prompts, max_new_tokens: int = 64, *, tokenizer=None, key=None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, stop_token_ids=None,
             gates=None, batch_size: int | None = None, on_token=None):
    """Continue prompts: token-id lists -> lists of new ids; strings (with `tokenizer`) -> new text.

    Greedy by default; `temperature > 0` samples (with `top_k` / `top_p`) and needs `key`.
    Rows stop at `stop_token_ids` (default: the tokenizer's EOS, if any), which are not
    returned, or after `max_new_tokens`. Prompts run `batch_size` at a time (default all);
    the last batch is padded so every batch reuses one compiled loop.

    Example:
        >>> import jax, jaxprune as jp
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> params = jp.init(cfg, jax.random.key(0))
        >>> [len(x) for x in generate(params, [[1, 2, 3], [4]], max_new_tokens=5)]
        [5, 5]
        >>> tok = jp.tokenizer("smollm2-135m")                                     # doctest: +SKIP
        >>> jp.generate(jp.load("smollm2-135m"), ["The capital of France is"], 8, tokenizer=tok)  # doctest: +SKIP
        [' Paris. It is the largest city']
    """
    _check_params(params)
    texts = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(isinstance(p, str) for p in prompts)
    if isinstance(prompts, str):
        raise InvalidArgumentError("prompts must be a list (of strings or of token-id lists), got one string")
    if texts:
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise InvalidArgumentError("text prompts need tokenizer= (an object with encode and decode)")
        ids = [list(tokenizer.encode(p)) for p in prompts]
        if any(not x for x in ids):
            raise InvalidArgumentError("a prompt encodes to no tokens")
    else:
        ids = prompts
    stops = _eos_ids(tokenizer) if stop_token_ids is None and tokenizer is not None else stop_token_ids
    gates_lib.check_gates(gates)
    N = check_max_new_tokens(max_new_tokens)
    sampler, key = _sampler_and_key(key, temperature, top_k, top_p)
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") or len(ids) == 0:
        raise InvalidArgumentError("prompts must be a non-empty list of strings or of token-id lists")
    bs = len(ids) if batch_size is None else min(check_int("batch_size", batch_size), len(ids))
    out: list[list[int]] = []
    for s in range(0, len(ids), bs):
        chunk = list(ids[s:s + bs])
        tokens, lengths = pad_prompts(params, chunk, N, rows=bs)
        new = np.asarray(_decode_jit(params, tokens, lengths, gates, stop_array(stops), jax.random.fold_in(key, s),
                                     sampler=sampler, max_new_tokens=N, with_logits=False, on_token=on_token))
        out += [trim(r, stops) for r in new[:len(chunk)]]
    if texts:
        return [tokenizer.decode(g) for g in out]
    return out
