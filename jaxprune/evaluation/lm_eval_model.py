"""`JaxpruneLM`: a jaxprune model as an `lm_eval.api.model.LM` (imports lm-evaluation-harness).

Import it through `jaxprune.evaluation.harness` (``harness.JaxpruneLM``, `lm_eval_model`), which
loads this module only when it is first used, so jaxprune itself never needs lm-eval.
"""

from __future__ import annotations

import collections
import logging

import jax
import numpy as np

from jaxprune.core.params import Params
from jaxprune.errors import InvalidArgumentError, check_int
from jaxprune.evaluation.scoring import (DEFAULT_MAX_BATCH_TOKENS, _check_params, _check_tokenizer, _ids,
                                         eos_token_ids, loglikelihoods, model_max_length, prefix_token_id,
                                         rolling_loglikelihoods)
from jaxprune.evaluation.text_generation import greedy_until

try:
    from lm_eval.api.model import LM
except ImportError as e:
    raise ImportError(f"jaxprune.evaluation.harness.JaxpruneLM needs lm-evaluation-harness ({e}): "
                      "pip install 'jaxprune[eval]'") from None

log = logging.getLogger(__name__)


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

