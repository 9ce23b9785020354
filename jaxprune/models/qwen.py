"""Qwen2 / Qwen2.5 (`qwen2`) and Qwen3 (`qwen3`): Llama's decoder with other options.

Qwen2: q/k/v projections have biases, o_proj has none. Qwen3: RMSNorm over head_dim on
queries and keys (``self_attn/q_norm``, ``self_attn/k_norm``, weight used as is) before
RoPE, an explicit head_dim, biases on all four attention projections iff `attention_bias`.
Both may use sliding-window attention on the layers `layer_types` marks
``"sliding_attention"`` (transformers: `use_sliding_window`, `max_window_layers`); released
checkpoints use full attention everywhere.

One file for both: Qwen3 is Qwen2 with q/k norms and configurable biases; the forward is
the shared decoder of `jaxprune.models.llama`.

Example:
    >>> cfg = Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, head_dim_override=8)
    >>> Qwen3Config.from_hf(cfg.to_hf()) == cfg, cfg.to_hf()["model_type"]
    (True, 'qwen3')
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprune.models.config import LayerTypes, LlamaConfig, check_layer_types, register_config, rope_to_hf
from jaxprune.models.llama import decoder_layout, embed, layer, layer_dims, per_layer_dims, shapes, unembed  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LayerTypes, LlamaConfig):
    """Qwen2 / Qwen2.5 decoder (`Qwen2ForCausalLM`). `attention_bias` and `mlp_bias` are unused
    (q/k/v always have biases, o_proj and the MLP never).

    sliding_window: window of ``"sliding_attention"`` layers (None: transformers'
      `use_sliding_window` is off).
    layer_types: one of ``"full_attention"``, ``"sliding_attention"`` per layer (None: all full).
    """

    sliding_window: int | None = None
    layer_types: tuple | None = None

    arch = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"
    # transformers' defaults for keys a config.json may leave out
    hf_defaults = {"tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
                   "max_position_embeddings": 32768}

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        check_layer_types(self)

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False

    @classmethod
    def _hf_kwargs(cls, d: dict[str, Any]) -> dict[str, Any]:
        d = {**cls.hf_defaults, **d}
        kw = super()._hf_kwargs(d)
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
        types = d.get("layer_types")
        if types is None:
            first = d.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                     for i in range(d["num_hidden_layers"])]
        kw.update(sliding_window=window, layer_types=tuple(types), attention_bias=False, mlp_bias=False)
        return kw

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        for k in ("rope_theta", "rope_scaling", "attention_bias", "mlp_bias"):
            d.pop(k)
        sliding = [i for i, t in enumerate(self.layer_types) if t == "sliding_attention"]
        d.update(architectures=[self.hf_architecture], model_type=self.arch,
                 rope_parameters=rope_to_hf(self.rope_theta, self.rope),
                 use_sliding_window=self.sliding_window is not None,
                 sliding_window=self.sliding_window,
                 max_window_layers=sliding[0] if sliding else self.num_hidden_layers,
                 layer_types=list(self.layer_types))
        return d


@dataclasses.dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
    """Qwen3 decoder (`Qwen3ForCausalLM`): Qwen2 plus q/k norms; `attention_bias` gives all four
    attention projections biases (released checkpoints: none)."""

    arch = "qwen3"
    hf_architecture = "Qwen3ForCausalLM"
    hf_defaults = {**Qwen2Config.hf_defaults, "head_dim": 128, "attention_bias": False}
    qk_norm = True

    qkv_bias = LlamaConfig.qkv_bias   # Llama's rule again: `attention_bias` sets all four
    o_bias = LlamaConfig.o_bias

    @classmethod
    def _hf_kwargs(cls, d: dict[str, Any]) -> dict[str, Any]:
        kw = super()._hf_kwargs(d)
        kw["attention_bias"] = {**cls.hf_defaults, **d}["attention_bias"]
        return kw

    def to_hf(self) -> dict[str, Any]:
        return {**super().to_hf(), "attention_bias": self.attention_bias}


register_config(Qwen2Config, "qwen2")
register_config(Qwen3Config, "qwen3")

QWEN2_LAYOUT = decoder_layout("qwen2", per_layer_config=("layer_types",))
QWEN3_LAYOUT = decoder_layout("qwen3", qk_norm=True, per_layer_config=("layer_types",))
