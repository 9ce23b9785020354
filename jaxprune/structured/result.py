"""`StructuredResult`: what every structured method (Bonsai, FinerCut, L0) returns.

Example:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
    >>> results = [jp.bonsai(params, calib, target=0.2, n_samples=0, show_progress=False),
    ...            jp.finercut(params, calib, n_remove=1, show_progress=False)]
    >>> [type(r).__name__ for r in results], all(isinstance(r, StructuredResult) for r in results)
    (['StructuredResult', 'FinerCutResult'], True)
    >>> small = results[0].compact()                      # the smaller dense model
    >>> jp.structured.non_embedding_params(small) < jp.structured.non_embedding_params(params)
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprune.core.params import Params


@dataclasses.dataclass(frozen=True)
class StructuredResult:
    """Gates of the pruned model and how it got there.

    gates: binary float gates (`jaxprune.models.gates`) of the pruned model; feed them to
      `jaxprune.compact` or `jaxprune.forward`.
    removed_fraction: fraction of non-embedding parameters the gates remove.
    history: one dict per round (Bonsai), removal (FinerCut) or logged step (L0): the same
      records the method's ``callback(record)`` received.
    params: the weights the gates apply to (L0 trains them; Bonsai and FinerCut return the
      params they were given).
    """

    gates: dict
    removed_fraction: float
    history: list
    params: Any = None

    def compact(self, params: Params | None = None) -> Params:
        """The smaller dense model: `jaxprune.compact` of `params` (default: `self.params`) by the gates."""
        from jaxprune.structured.compact import compact

        base = self.params if params is None else params
        if base is None:
            from jaxprune.errors import InvalidArgumentError
            raise InvalidArgumentError("this result holds no params: pass the params the gates were found for")
        return compact(base, self.gates)
