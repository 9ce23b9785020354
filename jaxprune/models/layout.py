"""One declaration per model family: what its weights are and how they slice.

A `Layout` names a family's sublayers, its linear layers and norms with the
*roles* of their axes, and its checkpoint names. Everything that needs to know
a family's structure reads it from here: structured units and compaction
(which rows and columns belong to a head, a K/V group, an FFN channel or a
hidden dim), FinerCut (which keys make up a sublayer), tensor parallelism
(which axis of a kernel splits over the ``"model"`` mesh axis), streaming and
LoRA (which kernels are linear layers), and the Hugging Face / GGUF name
tables in `jaxprune.io`.

Axis roles (like MaxText's logical axis names, resolved once here):

=========  ===================================================================
role       the axis runs over
=========  ===================================================================
hidden     residual-stream dims (sliced by a ``hidden`` gate)
heads      query heads x head_dim (sliced per query head)
groups     K/V heads x head_dim (sliced per K/V group)
ffn        FFN channels
fixed      something no gate slices (``head_dim`` of a q/k norm, OPT's projection dim)
=========  ===================================================================

Tensor parallelism follows from the roles: a kernel whose output role is
``heads``, ``groups`` or ``ffn`` splits its output axis (column parallel), one
whose input role is ``heads`` or ``ffn`` splits its input axis (row parallel).

Example:
    >>> from jaxprune.models import layout_of
    >>> from jaxprune.models.config import LlamaConfig
    >>> lay = layout_of(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
    ...                             num_hidden_layers=1, num_attention_heads=2))
    >>> lay.sublayer_keys("mlp")
    ('mlp', 'post_attention_layernorm')
    >>> lay.output_projection("attn").path, lay.leaf_roles(("mlp", "up_proj", "kernel"))
    (('self_attn', 'o_proj'), ('hidden', 'ffn'))
    >>> lay.split_axis(("self_attn", "q_proj", "kernel"), ndim=2), lay.split_axis(("mlp", "down_proj", "kernel"), 2)
    (1, 0)
"""

from __future__ import annotations

import dataclasses

SUBLAYERS = ("attn", "mlp")
ROLES = ("hidden", "heads", "groups", "ffn", "fixed")
_SPLIT_ROLES = ("heads", "groups", "ffn")


@dataclasses.dataclass(frozen=True)
class Linear:
    """A linear layer inside a decoder layer.

    path: its module path in the layer's params (``("self_attn", "q_proj")``); the
      leaves are ``kernel`` ``[in, out]`` and optionally ``bias`` ``[out]``.
    sublayer: ``"attn"`` or ``"mlp"``.
    roles: the roles of the kernel's (input, output) axes.
    gguf: llama.cpp's name for it inside ``blk.N`` (None: no GGUF name).
    """

    path: tuple
    sublayer: str
    roles: tuple
    gguf: str | None = None


@dataclasses.dataclass(frozen=True)
class Norm:
    """A norm inside a decoder layer: leaves ``scale`` (and ``bias``) over one axis of `role`.

    A ``"post"`` norm normalizes a sublayer's output before the residual add, so a sublayer
    gate folds into its scale (not into the output projection, which the norm would undo)."""

    path: tuple
    sublayer: str
    role: str = "hidden"
    gguf: str | None = None
    position: str = "pre"   # "pre": normalizes the sublayer's input; "post": its output (Gemma)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The structure of one family's params and checkpoints.

    name: the family (``config.arch``).
    linears, norms: every linear layer and norm of a decoder layer.
    top: top-level (outside ``layers``) module -> role of each axis of its leaves,
      e.g. ``{"norm": ("hidden",), "lm_head": ("hidden", "vocab")}``; ``"vocab"`` and
      ``"positions"`` axes are never sliced.
    embeddings: top-level keys not counted as non-embedding parameters.
    hf_prefix: prefix of the decoder's tensors in HF checkpoints (``"model."``).
    hf_tied_head: the HF checkpoint's ``lm_head.weight`` is always the embedding (OPT).
    config_widths: config field holding each uniform width: heads, kv_heads, ffn.
    gguf_arch: llama.cpp's ``general.architecture`` (None: no GGUF support).
    gguf_top: GGUF name -> HF module name of the tensors outside the layers.
    gguf_rotary: HF modules whose rows llama.cpp permutes for its rotary layout,
      with the config field holding their head count.
    per_layer_config: config fields holding one entry per layer (e.g. ``layer_types``), which
      compaction keeps in step when it drops layers.
    norm_offset: a norm multiplies by ``offset + scale`` (Gemma: 1.0, others 0.0).
    """

    name: str
    linears: tuple
    norms: tuple
    top: dict
    embeddings: tuple
    hf_prefix: str
    config_widths: dict
    hf_tied_head: bool = False
    gguf_arch: str | None = None
    gguf_top: dict = dataclasses.field(default_factory=dict)
    gguf_rotary: dict = dataclasses.field(default_factory=dict)
    per_layer_config: tuple = ()
    norm_offset: float = 0.0

    # ---- sublayers ----

    def sublayer_keys(self, kind: str) -> tuple:
        """Top-level keys of a layer's params that make up sublayer `kind` (first: present iff it is)."""
        keys = [l.path[0] for l in self.linears if l.sublayer == kind]
        keys += [n.path[0] for n in self.norms if n.sublayer == kind]
        return tuple(dict.fromkeys(keys))

    def sublayer_of(self, key: str) -> str:
        """The sublayer a layer's top-level key belongs to."""
        for kind in SUBLAYERS:
            if key in self.sublayer_keys(kind):
                return kind
        raise KeyError(f"{self.name}: layer key {key!r} belongs to no sublayer")

    def linears_of(self, kind: str) -> tuple:
        return tuple(l for l in self.linears if l.sublayer == kind)

    def norms_of(self, kind: str) -> tuple:
        return tuple(n for n in self.norms if n.sublayer == kind)

    def post_norm(self, kind: str) -> Norm | None:
        """The norm on a sublayer's output, if the family has one."""
        return next((n for n in self.norms_of(kind) if n.position == "post"), None)

    def output_projection(self, kind: str) -> Linear:
        """The linear layer whose input runs over a sublayer's units (o_proj, down_proj, fc2)."""
        unit = "heads" if kind == "attn" else "ffn"
        return next(l for l in self.linears if l.sublayer == kind and l.roles[0] == unit)

    def input_projections(self, kind: str) -> tuple:
        return tuple(l for l in self.linears_of(kind) if l is not self.output_projection(kind))

    # ---- leaves ----

    def linear_at(self, module_path: tuple) -> Linear | None:
        """The linear layer at a module path inside a layer (``("mlp", "up_proj")``), or None."""
        module_path = tuple(module_path)
        return next((l for l in self.linears if l.path == module_path), None)

    def norm_at(self, module_path: tuple) -> Norm | None:
        module_path = tuple(module_path)
        return next((n for n in self.norms if n.path == module_path), None)

    def is_linear_kernel(self, layer_path: tuple) -> bool:
        """Whether a leaf path inside a layer (``("mlp", "up_proj", "kernel")``) is a linear kernel."""
        return layer_path[-1:] == ("kernel",) and self.linear_at(layer_path[:-1]) is not None

    def leaf_roles(self, layer_path: tuple) -> tuple:
        """Roles of the axes of a leaf inside a layer: kernels both, biases the output's, norms theirs."""
        lin = self.linear_at(layer_path[:-1])
        if lin is not None:
            return lin.roles if layer_path[-1] == "kernel" else lin.roles[1:]
        norm = self.norm_at(layer_path[:-1])
        if norm is not None:
            return (norm.role,)
        raise KeyError(f"{self.name}: no linear layer or norm at {layer_path!r}")

    def top_roles(self, path: tuple) -> tuple:
        """Roles of the axes of a top-level leaf (``("norm", "scale")``)."""
        roles = self.top[path[0]]
        return roles[-1:] if path[-1] == "bias" else roles

    def split_axis(self, layer_path: tuple, ndim: int) -> int | None:
        """The axis of a leaf inside a layer that tensor parallelism splits, or None (replicated)."""
        lin = self.linear_at(layer_path[:-1])
        if lin is None:
            return None
        if lin.roles[1] in _SPLIT_ROLES:
            return ndim - 1                       # column parallel: kernel axis 1, bias axis 0
        if lin.roles[0] in _SPLIT_ROLES and layer_path[-1] == "kernel":
            return 0                              # row parallel: the bias stays whole
        return None

    def split_unit(self, layer_path: tuple) -> str:
        """The role of the axis `split_axis` splits (whole heads / groups stay together)."""
        lin = self.linear_at(layer_path[:-1])
        return lin.roles[1] if lin.roles[1] in _SPLIT_ROLES else lin.roles[0]


_REGISTRY: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    """Make `layout` the structure of every config whose ``arch`` is ``layout.name``."""
    _REGISTRY[layout.name] = layout
    return layout


def layout_of(config_or_arch) -> Layout:
    """The `Layout` of a config (or an ``arch`` name)."""
    arch = config_or_arch if isinstance(config_or_arch, str) else config_or_arch.arch
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise KeyError(f"no layout registered for architecture {arch!r}; known: {sorted(_REGISTRY)}") from None
