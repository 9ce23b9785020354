"""Standard evaluation: a jaxprune model inside lm-evaluation-harness.

`JaxpruneLM(params, tokenizer)` is an `lm_eval.api.model.LM`, so any
lm-evaluation-harness task (multiple choice, loglikelihood, rolling
loglikelihood, generation) runs on a dense, pruned or gated jaxprune model::

    import lm_eval, jaxprune as jp
    from jaxprune.evaluation.harness import JaxpruneLM
    lm = JaxpruneLM(jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m"), batch_size=8, max_length=1024)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

lm-eval is imported only when `JaxpruneLM` is first used (`pip install 'jaxprune[eval]'`).
The pieces underneath need no lm-eval and are modules of their own, re-exported here:
scoring (`jaxprune.evaluation.scoring`: `encode_pair`, `score_pairs`, `loglikelihoods`,
`rolling_loglikelihoods`) and generation with stop strings
(`jaxprune.evaluation.text_generation`: `generate_ids`, `greedy_until`, on the KV-cached
engine `jaxprune.generation`).

Example:
    >>> from jaxprune.evaluation import harness
    >>> callable(harness.register_with_lm_eval) and callable(harness.score_pairs)
    True
"""

from __future__ import annotations

import importlib

from jaxprune.core.buckets import length_bucket  # noqa: F401
from jaxprune.evaluation.scoring import (  # noqa: F401
    DEFAULT_MAX_BATCH_TOKENS,
    encode_pair,
    eos_token_ids,
    loglikelihoods,
    model_max_length,
    prefix_token_id,
    rolling_loglikelihoods,
    rolling_windows,
    score_pairs,
)
from jaxprune.evaluation.text_generation import generate_ids, greedy_until  # noqa: F401

EVAL_INSTALL = "pip install 'jaxprune[eval]'"


def _lm_class():
    return importlib.import_module("jaxprune.evaluation.lm_eval_model").JaxpruneLM


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
    from lm_eval.api import registry
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
