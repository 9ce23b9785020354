"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

`Sampler` is a frozen (hashable) setting, so a compiled decoding loop is specialised to it;
`sample` is pure and takes an explicit `jax.random` key.

Example:
    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.array([[0.0, 3.0, 1.0]])
    >>> sample(logits, None, Sampler()).tolist()                 # greedy
    [1]
    >>> s = Sampler(temperature=1.0, top_k=1)                    # top-1 sampling is greedy too
    >>> sample(logits, jax.random.key(0), s).tolist()
    [1]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprune.errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 is greedy (argmax; no key needed). Otherwise logits / temperature are
    restricted to the `top_k` largest (None: all) and to the smallest set whose probability
    reaches `top_p` (1.0: all), then one token is drawn."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
            raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {t!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InvalidArgumentError(f"top_k must be an integer >= 1 or None, got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise InvalidArgumentError(f"top_p must be a number in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits, sampler: Sampler):
    """Logits / temperature with everything outside top-k and top-p set to -inf."""
    x = logits.astype(jnp.float32) / sampler.temperature
    if sampler.top_k is not None and sampler.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sampler.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if sampler.top_p < 1.0:
        desc = jnp.sort(x, axis=-1)[..., ::-1]
        p = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(p, axis=-1) - p
        kept = jnp.where(mass_before < sampler.top_p, desc, jnp.inf)   # the first token is always kept
        x = jnp.where(x < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, x)
    return x


def sample(logits, key, sampler: Sampler):
    """Next token ids int32 [B] from logits [B, V]."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampler), axis=-1).astype(jnp.int32)
