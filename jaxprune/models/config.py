"""Model configurations: frozen, hashable, convertible to and from HF `config.json`.

A config is static metadata: it rides along with params as pytree aux data, so
`jit` specialises on it and `jax.tree` never sees it.

Example:
    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> cfg.head_dim, cfg.kv_groups
    (16, 2)
    >>> LlamaConfig.from_hf(cfg.to_hf()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprune.errors import UnsupportedModelError, InvalidArgumentError


def freeze(value):
    """Dicts become sorted item tuples so configs stay hashable."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


_freeze = freeze


def _thaw(value):
    if isinstance(value, tuple) and value and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in value):
        return {k: _thaw(v) for k, v in value}
    return value


def _layer_shapes_to_json(layer_shapes) -> list[dict]:
    """Frozen per-layer shapes -> a JSON list of dicts (`kv_groups` as a list)."""
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in entry} for entry in layer_shapes]


def _check_layer_shapes(layer_shapes) -> None:
    """Unequal K/V groups: `kv_groups` lists positive query-head counts, one per K/V head."""
    for i, entry in enumerate(layer_shapes or ()):
        d = dict(entry)
        groups = d.get("kv_groups")
        if groups is not None:
            if len(groups) != d["n_kv"] or sum(groups) != d["n_heads"] or min(groups) < 1:
                raise InvalidArgumentError(
                    f"layer_shapes[{i}]: kv_groups {tuple(groups)} must be {d['n_kv']} positive "
                    f"query-head counts summing to n_heads={d['n_heads']}")


LAYER_TYPES = ("full_attention", "sliding_attention")


def check_layer_types(config) -> None:
    """`layer_types` (None or a tuple): one known type per layer."""
    types = config.layer_types
    if types is None:
        return
    if len(types) != config.num_hidden_layers:
        raise InvalidArgumentError(f"layer_types has {len(types)} entries for num_hidden_layers="
                                   f"{config.num_hidden_layers}")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(f"layer types {unknown} are not supported (supported: {', '.join(LAYER_TYPES)})")


def rope_from_hf(scaling: dict | None, theta: float | None, params: dict | None = None) -> tuple:
    """(theta, scaling dict or None) from HF's legacy `rope_scaling`/`rope_theta` or from one
    transformers-5 `rope_parameters` dict (``rope_type``, ``rope_theta``, scaling keys)."""
    rope = scaling or None
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            rope = {k: v for k, v in params.items() if k != "rope_theta"}
    if rope is not None:
        rope = dict(rope)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported "
                                        "(supported: default, linear, llama3)")
        rope["rope_type"] = rope_type
        rope.pop("type", None)
        if rope_type == "default":
            rope = None
    return theta, rope


def rope_to_hf(theta: float, rope: dict | None) -> dict:
    """A transformers-5 `rope_parameters` dict."""
    return {"rope_type": "default", **(rope or {}), "rope_theta": theta}


class LayerTypes:
    """For configs with a `layer_types` tuple and one `sliding_window` (Gemma 2/3, Qwen2/3): layer i's
    type is ``layer_types[i]``, and ``"sliding_attention"`` layers see `sliding_window` keys."""

    def layer_type(self, i: int) -> str:
        return self.layer_types[i]

    def window_for(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == "sliding_attention" else None


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-family decoder (Llama 1/2/3, SmolLM, Mistral-without-sliding-window).

    Weight layout everywhere in jaxprune: dense kernels are `[in, out]`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim_override: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # frozen dict: rope_type, factor, ...
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Per-layer shapes of a compacted model, as frozen tuples (None: uniform).
    layer_shapes: tuple | None = None

    arch = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidArgumentError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in self.activations:
            raise UnsupportedModelError(f"{type(self).__name__}: hidden_act {self.hidden_act!r} is not supported "
                                        f"(supported: {', '.join(self.activations)})")
        _check_layer_shapes(self.layer_shapes)

    def kv_groups_of(self, i: int) -> tuple | None:
        """Query heads per K/V group of layer `i` when its groups are unequal (else None)."""
        if self.layer_shapes is None:
            return None
        groups = dict(self.layer_shapes[i]).get("kv_groups")
        return tuple(groups) if groups else None

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope(self) -> dict | None:
        return _thaw(self.rope_scaling) if self.rope_scaling else None

    # ---- decoder options read by the shared decoder (`jaxprune.models.llama`); other families
    # (Gemma, Qwen, Mistral: subclasses in `jaxprune.models`) override them ----
    activations = ("silu", "swish")  # accepted `hidden_act` values
    qk_norm = False                  # RMSNorm over head_dim on queries and keys before RoPE
    norm_offset = 0.0                # every RMSNorm multiplies by (norm_offset + scale)
    sandwich_norms = False           # Gemma: norms on both sublayers' inputs and outputs

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def query_scale(self) -> float:
        """Multiplier of the queries (attention logits)."""
        return self.head_dim ** -0.5

    @property
    def attn_softcap(self) -> float | None:
        """Attention logits become ``tanh(s / cap) * cap`` (None: no capping)."""
        return None

    @property
    def final_softcap(self) -> float | None:
        return None

    @property
    def embed_multiplier(self) -> float | None:
        """Multiplier of the token embeddings (None: none)."""
        return None

    def layer_type(self, i: int) -> str:
        """``"full_attention"`` or ``"sliding_attention"`` for layer `i` (transformers' `layer_types`)."""
        return "full_attention"

    @property
    def attention_kinds(self) -> tuple:
        """The distinct layer types, in order of first use."""
        return tuple(dict.fromkeys(self.layer_type(i) for i in range(self.num_hidden_layers)))

    def window_for(self, layer_type: str) -> int | None:
        """The sliding window of layers of `layer_type`: a query at t sees keys in (t - window, t]."""
        return None

    def rope_for(self, layer_type: str) -> tuple:
        """(rope theta, scaling dict or None) of layers of `layer_type`."""
        return self.rope_theta, self.rope

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "LlamaConfig":
        return cls(**cls._hf_kwargs(d))

    @classmethod
    def _hf_kwargs(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from an HF config dict (subclasses add their fields)."""
        params = d.get("rope_parameters")  # transformers >= 5 spelling
        theta, rope = rope_from_hf(d.get("rope_scaling"), d.get("rope_theta"),
                                   params if isinstance(params, dict) and "full_attention" not in params else None)
        eos = d.get("eos_token_id", 2)
        return dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim_override=d.get("head_dim") if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]) else None,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta if theta is not None else 10000.0,
            rope_scaling=_freeze(rope), max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
            hidden_act=d.get("hidden_act", "silu"), bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            layer_shapes=_freeze(d.get("jaxprune_layer_shapes")),
        )

    def to_hf(self) -> dict[str, Any]:
        d = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }
        if self.layer_shapes is not None:
            d["jaxprune_layer_shapes"] = _layer_shapes_to_json(self.layer_shapes)
        return d


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """OPT decoder (facebook/opt-*): learned positions with offset 2, LayerNorm, ReLU MLP."""

    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None
    head_dim_override: int | None = None  # set by compaction when hidden_size / heads changes
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    pad_token_id: int | None = 1
    layer_shapes: tuple | None = None

    arch = "opt"
    tie_word_embeddings = True
    position_offset = 2

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.activation_function not in ("relu", "gelu", "gelu_new"):
            raise UnsupportedModelError(f"OPT activation {self.activation_function!r} is not supported")
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise InvalidArgumentError(f"hidden_size={self.hidden_size} is not divisible by "
                                       f"num_attention_heads={self.num_attention_heads}")
        _check_layer_shapes(self.layer_shapes)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return self.ffn_dim

    @property
    def kv_groups(self) -> int:
        return 1

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "OPTConfig":
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], ffn_dim=d["ffn_dim"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            word_embed_proj_dim=d.get("word_embed_proj_dim"),
            head_dim_override=d["head_dim"] if d.get("head_dim") not in (None, d["hidden_size"] / d["num_attention_heads"]) else None,
            do_layer_norm_before=d.get("do_layer_norm_before", True),
            remove_final_layer_norm=d.get("_remove_final_layer_norm", False),
            activation_function=d.get("activation_function", "relu"),
            enable_bias=d.get("enable_bias", True),
            layer_norm_elementwise_affine=d.get("layer_norm_elementwise_affine", True),
            bos_token_id=d.get("bos_token_id", 2), eos_token_id=d.get("eos_token_id", 2),
            pad_token_id=d.get("pad_token_id", 1),
            layer_shapes=_freeze(d.get("jaxprune_layer_shapes")),
        )

    def to_hf(self) -> dict[str, Any]:
        d = {
            "architectures": ["OPTForCausalLM"], "model_type": "opt",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "ffn_dim": self.ffn_dim,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "do_layer_norm_before": self.do_layer_norm_before,
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "activation_function": self.activation_function, "enable_bias": self.enable_bias,
            "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "tie_word_embeddings": True, "torch_dtype": "float32",
        }
        if self.head_dim_override is not None:
            d["head_dim"] = self.head_dim_override
        if self.layer_shapes is not None:
            d["jaxprune_layer_shapes"] = _layer_shapes_to_json(self.layer_shapes)
        return d


ModelConfig = LlamaConfig | OPTConfig

_BY_MODEL_TYPE: dict[str, type] = {}


def register_config(cls, *model_types: str):
    """Make `config_from_hf` build `cls` (via ``cls.from_hf``) for these HF `model_type` values."""
    for t in model_types:
        _BY_MODEL_TYPE[t] = cls
    return cls


register_config(LlamaConfig, "llama", "smollm")
register_config(OPTConfig, "opt")


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a config from a parsed HF `config.json`, rejecting unknown architectures."""
    from jaxprune import models  # noqa: F401  (importing the model families registers their model types)
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type not in _BY_MODEL_TYPE:
        hint = " (only the text model is supported: model_type 'gemma3_text', Gemma3ForCausalLM)" \
            if model_type == "gemma3" else ""
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} (architectures {archs}) is not supported{hint}; "
            f"jaxprune implements: {sorted(set(_BY_MODEL_TYPE) - {'smollm'})}")
    try:
        return _BY_MODEL_TYPE[model_type].from_hf(d)
    except KeyError as e:
        raise UnsupportedModelError(f"{source}: required field {e.args[0]!r} is missing") from None
