"""The package structure holds: no cross-package private imports, no import cycles, and every
family's Layout describes exactly the params its forward uses."""

from __future__ import annotations

import ast
import os

import jax
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import models
from jaxprune.models.layout import layout_of

ROOT = os.path.join(os.path.dirname(jp.__file__))


def _modules():
    for d, _, fs in os.walk(ROOT):
        for f in fs:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield path, rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _package(module: str) -> str:
    """The first-level package (or top-level module) a module belongs to: jaxprune.models.llama -> models."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: str, module: str, top_level_only: bool = False):
    """(imported module, names) of every `from X import names` in a file (or only its module-level
    ones), relative ones resolved."""
    tree = ast.parse(open(path).read())
    is_pkg = path.endswith("__init__.py")
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names]


def test_no_module_imports_another_packages_private_names():
    bad = []
    for path, module in _modules():
        for target, names in _imports(path, module):
            if not target.startswith("jaxprune"):
                continue
            if _package(target) == _package(module):
                continue
            bad += [f"{module} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_the_private_import_check_can_fail(tmp_path):
    """The checker above sees a cross-package private import (guards against a checker that finds nothing)."""
    p = tmp_path / "jaxprune" / "eval_x.py"
    p.parent.mkdir()
    p.write_text("from .models import _forward\nfrom jaxprune.sparsity.masks import _show\n")
    found = [(t, n) for t, names in _imports(str(p), "jaxprune.eval_x") for n in names]
    assert ("jaxprune.models", "_forward") in found and ("jaxprune.sparsity.masks", "_show") in found


def test_no_import_cycles_between_packages_at_module_level():
    """Module-level imports between first-level packages form no cycle (function-level lazy imports,
    used for optional heavy dependencies, are allowed)."""
    edges: dict[str, set] = {}
    for path, module in _modules():
        src = _package(module)
        for target, _ in _imports(path, module, top_level_only=True):
            if target.startswith("jaxprune.") and src and _package(target) != src and module != "jaxprune":
                edges.setdefault(src, set()).add(_package(target))
    # depth-first search for a cycle
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in edges.get(n, ()):
            if state.get(m) == 1:
                raise AssertionError("import cycle between packages: " + " -> ".join(stack + [n, m]))
            if not state.get(m):
                visit(m, stack + [n])
        state[n] = 2

    for n in list(edges):
        if not state.get(n):
            visit(n, [])


FAMILY_CONFIGS = {
    "llama": lambda: jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
    "opt": lambda: jp.OPTConfig(vocab_size=32, hidden_size=16, ffn_dim=24, num_hidden_layers=2,
                                num_attention_heads=4),
    "gemma2": lambda: jp.Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim_override=8),
    "gemma3": lambda: jp.Gemma3Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim_override=8),
    "qwen2": lambda: jp.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2),
    "qwen3": lambda: jp.Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim_override=8),
    "mistral": lambda: jp.MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
}


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_layout_describes_every_layer_leaf(name):
    """Each leaf of a layer has roles in the Layout, and each role's axis has the width the config implies."""
    cfg = FAMILY_CONFIGS[name]()
    params = models.init(cfg, jax.random.key(0))
    lay = layout_of(cfg)
    width = {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads * cfg.head_dim,
             "groups": cfg.num_key_value_heads * cfg.head_dim, "ffn": cfg.intermediate_size}
    seen_linears = set()
    for lp in params.tree["layers"]:
        for kp, leaf in jax.tree_util.tree_flatten_with_path(lp)[0]:
            names = tuple(k.key for k in kp)
            roles = lay.leaf_roles(names)
            assert len(roles) == np.ndim(leaf), (names, roles, np.shape(leaf))
            for r, n in zip(roles, np.shape(leaf)):
                if r in width:
                    assert n == width[r], (names, r, n)
            if names[-1] == "kernel":
                seen_linears.add(names[:-1])
            assert names[0] in lay.sublayer_keys(lay.sublayer_of(names[0]))
    assert seen_linears == {l.path for l in lay.linears}
    assert {names[:-1] for lp in params.tree["layers"] for kp, _ in jax.tree_util.tree_flatten_with_path(lp)[0]
            for names in [tuple(k.key for k in kp)] if names[-1] == "scale"} == {n.path for n in lay.norms}
    for key, node in params.tree.items():
        if key != "layers":
            for kp, leaf in jax.tree_util.tree_flatten_with_path(node)[0]:
                assert len(lay.top_roles((key,) + tuple(k.key for k in kp))) == np.ndim(leaf)
