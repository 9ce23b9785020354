"""Orbax checkpoints of params + masks + gates, standalone or inside a `CheckpointManager`.

A checkpoint is one orbax composite item per part — `params`, `masks`, `gates`
(arrays, via `StandardSave`) and `config`, `metadata` (JSON) — so the layout of
`save_checkpoint(path, ...)` is exactly one step of a `CheckpointManager` built
with `checkpoint_args`: `load_checkpoint` reads either. Arrays keep their dtype
and sharding; the model config travels with them, so `params` come back as
`Params`. Orbax writes under a temporary name and renames on commit.

Example:
    >>> import jax, tempfile, os, numpy as np, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> masks = jp.magnitude(params, 0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = jp.save_checkpoint(path, params, masks=masks)
    >>> ck = jp.load_checkpoint(path)
    >>> ck.params.config == cfg, ck.gates is None
    (True, True)
    >>> bool(np.array_equal(ck.masks["layers"][0]["mlp"]["up_proj"]["kernel"],
    ...                     masks["layers"][0]["mlp"]["up_proj"]["kernel"]))
    True

In a training loop, let orbax's `CheckpointManager` keep the last few steps:
    >>> import orbax.checkpoint as ocp                                            # doctest: +SKIP
    >>> mngr = ocp.CheckpointManager(run_dir, options=ocp.CheckpointManagerOptions(max_to_keep=3))  # doctest: +SKIP
    >>> mngr.save(step, args=jp.checkpoint_args(params, masks=masks, gates=gates))  # doctest: +SKIP
    >>> ck = jp.restore_checkpoint(mngr)                # the latest step           # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import numpy as np

from jaxprune.models.config import config_from_hf
from jaxprune.errors import CheckpointError, InvalidArgumentError
from jaxprune.sparsity.masks import check_masks_like
from jaxprune.core.params import Params

ITEMS = ("params", "masks", "gates", "config", "metadata")


class Checkpoint(NamedTuple):
    """What `load_checkpoint` / `restore_checkpoint` return (absent parts are None)."""
    params: Params
    masks: Params | None
    gates: dict | None
    metadata: dict | None


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def _tree_of(x, what: str):
    if isinstance(x, Params):
        return x.tree
    if isinstance(x, dict):
        return x
    raise InvalidArgumentError(f"{what} must be jaxprune Params or a dict of arrays, got {type(x).__name__}")


def _check_masks(params: Params, masks) -> None:
    check_masks_like(params.tree, _tree_of(masks, "masks"))


def checkpoint_args(params: Params, masks=None, gates: dict | None = None, metadata: dict | None = None):
    """`orbax.checkpoint.args.Composite` for `CheckpointManager.save(step, args=...)` (or a
    `Checkpointer(CompositeCheckpointHandler())`): params (with their config), and optionally
    masks shaped like params, a gates dict, and JSON-serialisable metadata (e.g. the step's loss)."""
    ocp = _ocp()
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"params must be jaxprune Params (they carry the config), got "
                                   f"{type(params).__name__}")
    items = {"params": ocp.args.StandardSave(params.tree), "config": ocp.args.JsonSave(params.config.to_hf())}
    if masks is not None:
        _check_masks(params, masks)
        items["masks"] = ocp.args.StandardSave(jax.tree.map(np.asarray, _tree_of(masks, "masks")))
    if gates is not None:
        if not isinstance(gates, dict):
            raise InvalidArgumentError(f"gates must be a dict of arrays, got {type(gates).__name__}")
        items["gates"] = ocp.args.StandardSave(gates)
    if metadata is not None:
        items["metadata"] = ocp.args.JsonSave(metadata)
    return ocp.args.Composite(**items)


def save_checkpoint(path: str, params: Params, masks=None, gates: dict | None = None,
                    metadata: dict | None = None, overwrite: bool = False) -> str:
    """Write params (+ masks, gates, metadata) as an orbax checkpoint directory; returns its path.

    Raises CheckpointError if `path` exists (unless `overwrite`) or cannot be written; nothing is
    left behind on failure.
    """
    ocp = _ocp()
    args = checkpoint_args(params, masks, gates, metadata)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise CheckpointError(f"cannot write to {parent}: {e.strerror}") from None
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        try:
            ckptr.save(path, args=args, force=overwrite)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"writing {path} failed: {e}") from None
    return path


def _from_restored(restored, source: str) -> Checkpoint:
    if restored.get("config") is None or restored.get("params") is None:
        raise CheckpointError(f"{source}: not a jaxprune checkpoint (no params/config items)")
    config = config_from_hf(restored["config"], source=source)
    params = Params(config, restored["params"])
    masks = restored.get("masks")
    return Checkpoint(params, Params(config, masks) if masks is not None else None,
                      restored.get("gates"), restored.get("metadata"))


def is_checkpoint(path: str) -> bool:
    """Whether `path` is an orbax checkpoint written by `save_checkpoint` / `checkpoint_args`."""
    return os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "config"))


def _restore_args(path: str):
    ocp = _ocp()
    items = {}
    for name in ITEMS:
        if os.path.isdir(os.path.join(path, name)):
            items[name] = ocp.args.JsonRestore() if name in ("config", "metadata") else ocp.args.StandardRestore()
    return ocp.args.Composite(**items)


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (or one step directory of a `CheckpointManager`
    saved with `checkpoint_args`): `Checkpoint(params, masks, gates, metadata)`."""
    ocp = _ocp()
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: not a jaxprune orbax checkpoint (needs params/ and config/ items)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        try:
            restored = ckptr.restore(path, args=_restore_args(path))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot restore ({type(e).__name__}: {str(e)[:300]})") from None
    return _from_restored(restored, path)


def restore_checkpoint(manager, step: int | None = None) -> Checkpoint:
    """Restore `step` (default: the latest) from an orbax `CheckpointManager` whose steps were saved
    with `checkpoint_args`."""
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise CheckpointError(f"{manager.directory}: no checkpoint for step {step} "
                              f"(steps: {list(manager.all_steps())})")
    restored = manager.restore(step)
    return _from_restored({k: restored[k] for k in restored.keys()}, f"{manager.directory} step {step}")


__all__ = ["Checkpoint", "checkpoint_args", "is_checkpoint", "load_checkpoint", "restore_checkpoint",
           "save_checkpoint"]
