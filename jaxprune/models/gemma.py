"""Gemma 2 (`gemma2`) and Gemma 3 text models (`gemma3_text`, `Gemma3ForCausalLM`): Llama's
decoder with Gemma's options.

- GeGLU MLP (`hidden_activation` ``gelu_pytorch_tanh``: GELU, tanh approximation).
- RMSNorm multiplying by ``1 + w`` in float32; params store HF's ``w`` as is.
- "Sandwich" norms: `input_layernorm` -> attention -> `post_attention_layernorm` (on the
  attention *output*, unlike Llama) -> residual; `pre_feedforward_layernorm` -> MLP ->
  `post_feedforward_layernorm` -> residual.
- Token embeddings times `embed_scale` (sqrt(hidden_size), cast to the embedding dtype).
- Queries scaled by ``query_pre_attn_scalar ** -0.5``.
- Sliding-window (``"sliding_attention"``) and global layers as `layer_types` lists them.
- Gemma 2: attention logits and final logits soft-capped (``tanh(s / cap) * cap``).
- Gemma 3: q/k RMSNorm over head_dim (``1 + w``) before RoPE; RoPE base `rope_local_base_freq`
  on sliding layers and `rope_theta` (with `rope_scaling`, e.g. linear) on global ones; no
  attention soft-capping (transformers ignores `attn_logit_softcapping` there).

One file for both: Gemma 3's text decoder is Gemma 2's plus q/k norms and per-type RoPE.

Example:
    >>> cfg = Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                    num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    >>> cfg.layer_types, cfg.embed_scale
    (('sliding_attention', 'full_attention'), 4.0)
    >>> Gemma2Config.from_hf(cfg.to_hf()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxprune.models.config import LayerTypes, LlamaConfig, check_layer_types, freeze, register_config, rope_from_hf, rope_to_hf
from jaxprune.errors import UnsupportedModelError
from jaxprune.models.llama import decoder_layout, embed, layer, layer_dims, per_layer_dims, shapes, unembed  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Gemma2Config(LayerTypes, LlamaConfig):
    """Gemma 2 decoder (`Gemma2ForCausalLM`). `mlp_bias` is unused (no MLP biases).

    query_pre_attn_scalar: queries are multiplied by its ``-0.5`` power.
    sliding_window: window of ``"sliding_attention"`` layers.
    layer_types: per layer ``"sliding_attention"`` or ``"full_attention"`` (None: alternate,
      starting with sliding, as transformers does).
    attn_logit_softcapping, final_logit_softcapping: ``tanh(s / cap) * cap`` (None: off).
    embed_scale: multiplier of the token embeddings (None: sqrt(hidden_size), fixed at
      construction). Stored explicitly so compacting hidden dims keeps the model's logits;
      transformers recomputes it from `hidden_size`, so a checkpoint whose hidden size was
      compacted carries ``jaxprune_embed_scale`` in config.json, which only jaxprune reads.
    """

    hidden_act: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple | None = None
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    embed_scale: float | None = None

    arch = "gemma2"
    hf_architecture = "Gemma2ForCausalLM"
    hf_model_type = "gemma2"
    hf_defaults = {"head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                   "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "bos_token_id": 2, "eos_token_id": 1,
                   "max_position_embeddings": 8192}
    activations = ("gelu_pytorch_tanh", "gelu_new", "gelu")
    norm_offset = 1.0
    sandwich_norms = True

    def __post_init__(self):
        super().__post_init__()
        if self.embed_scale is None:
            object.__setattr__(self, "embed_scale", math.sqrt(self.hidden_size))
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", self.default_layer_types(self.num_hidden_layers))
        check_layer_types(self)

    @staticmethod
    def default_layer_types(n: int) -> tuple:
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n))

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    @property
    def attn_softcap(self) -> float | None:
        return self.attn_logit_softcapping

    @property
    def final_softcap(self) -> float | None:
        return self.final_logit_softcapping

    @property
    def embed_multiplier(self) -> float:
        return self.embed_scale

    @classmethod
    def _hf_kwargs(cls, d: dict[str, Any]) -> dict[str, Any]:
        d = {**cls.hf_defaults, **d}
        if d.get("use_bidirectional_attention"):
            raise UnsupportedModelError(f"{cls.hf_model_type}: use_bidirectional_attention is not supported")
        kw = super()._hf_kwargs(d)
        kw.update(hidden_act=d.get("hidden_activation") or d.get("hidden_act"), mlp_bias=False,
                  query_pre_attn_scalar=d["query_pre_attn_scalar"], sliding_window=d["sliding_window"],
                  layer_types=tuple(d["layer_types"]) if d.get("layer_types") else None,
                  attn_logit_softcapping=d["attn_logit_softcapping"],
                  final_logit_softcapping=d["final_logit_softcapping"],
                  embed_scale=d.get("jaxprune_embed_scale"))
        return kw

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        for k in ("rope_theta", "rope_scaling", "hidden_act", "mlp_bias"):
            d.pop(k)
        d.update(architectures=[self.hf_architecture], model_type=self.hf_model_type,
                 hidden_activation=self.hidden_act, query_pre_attn_scalar=self.query_pre_attn_scalar,
                 sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                 attn_logit_softcapping=self.attn_logit_softcapping,
                 final_logit_softcapping=self.final_logit_softcapping,
                 rope_parameters=rope_to_hf(self.rope_theta, self.rope))
        if self.embed_scale != math.sqrt(self.hidden_size):
            d["jaxprune_embed_scale"] = self.embed_scale
        return d


@dataclasses.dataclass(frozen=True)
class Gemma3Config(Gemma2Config):
    """Gemma 3 text decoder (`Gemma3ForCausalLM`, model_type ``gemma3_text``).

    rope_theta, rope_scaling: RoPE of ``"full_attention"`` layers; rope_local_base_freq: RoPE
    base of ``"sliding_attention"`` layers (no scaling). layer_types None: five sliding layers
    then one global, repeated. `attn_logit_softcapping` is kept for the config but, as in
    transformers, not applied.
    """

    rope_theta: float = 1_000_000.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float = 10_000.0

    arch = "gemma3"
    hf_architecture = "Gemma3ForCausalLM"
    hf_model_type = "gemma3_text"
    hf_defaults = {**Gemma2Config.hf_defaults, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                   "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "max_position_embeddings": 131072}
    qk_norm = True

    @staticmethod
    def default_layer_types(n: int, pattern: int = 6) -> tuple:
        """transformers' default (`sliding_window_pattern` 6): five sliding layers, then one global."""
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))

    @property
    def attn_softcap(self) -> None:
        return None

    def rope_for(self, layer_type: str) -> tuple:
        if layer_type == "sliding_attention":
            return self.rope_local_base_freq, None
        return self.rope_theta, self.rope

    @classmethod
    def _hf_kwargs(cls, d: dict[str, Any]) -> dict[str, Any]:
        d = {**cls.hf_defaults, **d}
        kw = super()._hf_kwargs(d)
        params = d.get("rope_parameters")
        if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
            theta, rope = rope_from_hf(d.get("rope_scaling"), d["rope_theta"], params.get("full_attention"))
            local, local_rope = rope_from_hf(None, d["rope_local_base_freq"], params.get("sliding_attention"))
        else:  # transformers < 5: rope_theta, rope_scaling (global layers), rope_local_base_freq
            theta, rope = rope_from_hf(d.get("rope_scaling"), d["rope_theta"], params)
            local, local_rope = d["rope_local_base_freq"], None
        if local_rope is not None:
            raise UnsupportedModelError("gemma3_text: RoPE scaling on sliding-window layers is not supported")
        if not d.get("layer_types"):
            pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
            kw["layer_types"] = cls.default_layer_types(d["num_hidden_layers"], pattern)
        kw.update(rope_theta=theta, rope_scaling=freeze(rope), rope_local_base_freq=local)
        return kw

    def to_hf(self) -> dict[str, Any]:
        d = super().to_hf()
        d["rope_parameters"] = {"full_attention": rope_to_hf(self.rope_theta, self.rope),
                                "sliding_attention": rope_to_hf(self.rope_local_base_freq, None)}
        return d


register_config(Gemma2Config, "gemma2")
register_config(Gemma3Config, "gemma3_text")

GEMMA2_LAYOUT = decoder_layout("gemma2", sandwich_norms=True, per_layer_config=("layer_types",), norm_offset=1.0)
GEMMA3_LAYOUT = decoder_layout("gemma3", qk_norm=True, sandwich_norms=True, per_layer_config=("layer_types",),
                               norm_offset=1.0)
