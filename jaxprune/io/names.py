"""Hugging Face tensor names <-> jaxprune's params tree.

The one place where HF's `[out, in]` Linear weights become `[in, out]` kernels
(and back). Works on any mapping of name -> array-like (numpy memmaps, torch
tensors converted to numpy), so loading stays lazy until the arrays are needed.

Example:
    >>> hf_to_path("model.layers.3.self_attn.q_proj.weight", "llama")
    ('layers', 3, 'self_attn', 'q_proj', 'kernel')
    >>> path_to_hf(('layers', 3, 'self_attn', 'q_proj', 'kernel'), "llama")
    'model.layers.3.self_attn.q_proj.weight'
"""

from __future__ import annotations

from typing import Any, Callable

from jaxprune.models.layout import layout_of

_EMBEDDINGS = {"embed_tokens", "embed_positions"}


def _is_norm(module: str) -> bool:
    return "norm" in module


def hf_to_path(name: str, arch: str) -> tuple | None:
    """Tree path of an HF tensor name, or None for names jaxprune does not keep (tied lm_head, buffers)."""
    lay = layout_of(arch)
    prefix = lay.hf_prefix
    if name.startswith(prefix):
        parts = name[len(prefix):].split(".")
    elif name.startswith("lm_head."):
        if lay.hf_tied_head:
            return None  # e.g. OPT: the head is always embed_tokens
        parts = name.split(".")
    else:
        return None
    if parts[-1] not in ("weight", "bias"):
        return None  # e.g. rotary_emb.inv_freq buffers in old checkpoints
    if parts[0] == "layers":
        parts[1] = int(parts[1])
    module, leaf = parts[-2], parts[-1]
    if leaf == "bias":
        new_leaf = "bias"
    elif module in _EMBEDDINGS:
        new_leaf = "embedding"
    elif _is_norm(module):
        new_leaf = "scale"
    else:
        new_leaf = "kernel"
    return tuple(parts[:-1]) + (new_leaf,)


def path_to_hf(path: tuple, arch: str) -> str:
    """HF tensor name of a tree path (inverse of `hf_to_path`)."""
    leaf = path[-1]
    head = ".".join(str(p) for p in path[:-1])
    hf_leaf = "bias" if leaf == "bias" else "weight"
    if path[0] == "lm_head":
        return f"lm_head.{hf_leaf}"
    return f"{layout_of(arch).hf_prefix}{head}.{hf_leaf}"


def needs_transpose(path: tuple) -> bool:
    return path[-1] == "kernel"


def build_tree(named: dict[str, Any], arch: str, convert: Callable[[Any, bool], Any]) -> dict:
    """Nested tree from HF-named arrays; `convert(array, transpose)` makes each leaf."""
    tree: dict = {}
    layers: dict[int, dict] = {}
    for name, arr in named.items():
        path = hf_to_path(name, arch)
        if path is None:
            continue
        if path[0] == "layers":
            node = layers.setdefault(path[1], {})
            rest = path[2:]
        else:
            node, rest = tree, path
        for p in rest[:-1]:
            node = node.setdefault(p, {})
        node[rest[-1]] = convert(arr, needs_transpose(path))
    if layers:
        tree["layers"] = [layers.get(i, {}) for i in range(max(layers) + 1)]
    return tree


def flatten_tree(tree: dict, arch: str) -> dict[str, tuple[tuple, Any]]:
    """HF name -> (tree path, leaf) for every leaf of `tree`."""
    out = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))
        else:
            out[path_to_hf(path, arch)] = (path, node)

    walk(tree, ())
    return out
