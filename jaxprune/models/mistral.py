"""Mistral (`mistral`): Llama's decoder with sliding-window attention on every layer when
`sliding_window` is set (Mistral 7B v0.1; later releases set it to null and are Llamas).

Example:
    >>> cfg = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                     num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    >>> cfg.window_for(cfg.layer_type(0)), MistralConfig.from_hf(cfg.to_hf()) == cfg
    (8, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprune.models.config import LlamaConfig, register_config, rope_to_hf
from jaxprune.models.llama import decoder_layout, embed, layer, layer_dims, per_layer_dims, shapes, unembed  # noqa: F401


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    """Mistral decoder (`MistralForCausalLM`); `attention_bias`/`mlp_bias` are unused (no biases).

    sliding_window: every layer's window (a query at t sees keys in (t - window, t]); None: full.
    """

    sliding_window: int | None = None

    arch = "mistral"
    hf_defaults = {"sliding_window": 4096, "tie_word_embeddings": False, "max_position_embeddings": 131072}

    def layer_type(self, i: int) -> str:
        return "full_attention" if self.sliding_window is None else "sliding_attention"

    def window_for(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == "sliding_attention" else None

    @classmethod
    def _hf_kwargs(cls, d: dict[str, Any]) -> dict[str, Any]:
        d = {**cls.hf_defaults, **d}
        return {**super()._hf_kwargs(d), "sliding_window": d["sliding_window"],
                "attention_bias": False, "mlp_bias": False}

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        for k in ("rope_theta", "rope_scaling", "attention_bias", "mlp_bias"):
            d.pop(k)
        d.update(architectures=["MistralForCausalLM"], model_type="mistral",
                 rope_parameters=rope_to_hf(self.rope_theta, self.rope), sliding_window=self.sliding_window)
        return d


register_config(MistralConfig, "mistral")

LAYOUT = decoder_layout("mistral")
