"""Input checks shared by every entry point (one place, one wording).

Example:
    >>> import numpy as np
    >>> is_real_dtype(np.float32), is_real_dtype(np.complex64), is_real_dtype(None)
    (True, False, False)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def is_real_dtype(dtype) -> bool:
    """Whether `dtype` is a boolean or real numeric dtype (not complex, not a foreign dtype object)."""
    if dtype is None:
        return False
    try:
        return dtype == np.bool_ or (jnp.issubdtype(dtype, jnp.number) and not jnp.issubdtype(dtype, jnp.complexfloating))
    except Exception:  # not a dtype at all (e.g. a torch dtype)
        return False


def check_tokens(config, tokens, what: str = "calibration", error=None, min_len: int = 2,
                 check_context: bool = True) -> np.ndarray:
    """Token ids int [n >= 1, seqlen >= min_len] inside the vocabulary (and the context window of
    models with learned or limited positions): the one check every method's data goes through.

    Returns the tokens as int32 numpy; raises `error` (default `jaxprune.DataError`) naming
    `what` and the bad value otherwise.

    Example:
        >>> from jaxprune.models.config import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
        ...                   num_attention_heads=1)
        >>> check_tokens(cfg, [[1, 2, 3]]).dtype
        dtype('int32')
        >>> check_tokens(cfg, [[1, 9]])
        Traceback (most recent call last):
        ...
        jaxprune.errors.DataError: calibration token ids must lie in [0, 8), got [1, 9]
    """
    from jaxprune.errors import DataError

    error = error or DataError
    try:
        t = np.asarray(tokens)
    except (ValueError, TypeError) as e:   # e.g. ragged nested lists
        raise error(f"{what} tokens must be an int array [n, seqlen], got {type(tokens).__name__} "
                    f"({str(e).splitlines()[0][:120]})") from None
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] < min_len:
        raise error(f"{what} tokens must be an int array [n >= 1, seqlen >= {min_len}], got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise error(f"{what} tokens must be integer ids, got {t.dtype}")
    V = config.vocab_size
    if t.min() < 0 or t.max() >= V:
        raise error(f"{what} token ids must lie in [0, {V}), got [{t.min()}, {t.max()}]")
    context = getattr(config, "max_position_embeddings", None)
    if check_context and context is not None and t.shape[1] > context:
        raise error(f"{what} seqlen {t.shape[1]} exceeds the model's context ({context})")
    return t.astype(np.int32)
