"""Orbax checkpoints of params + masks + gates, standalone or inside a `CheckpointManager`.

A checkpoint is one orbax composite item per part — `params`, `masks`, `gates`
(arrays, via `StandardSave`) and `config`, `metadata` (JSON) — so the layout of
`save_checkpoint(path, ...)` is exactly one step of a `CheckpointManager` built
with `checkpoint_args`: `load_checkpoint` reads either. Arrays keep their dtype
and sharding; the model config travels with them, so `params` come back as
`Params`. Orbax writes under a temporary name and renames on commit; a checkpoint
is checked (JSON bounded, shapes against its config) before orbax reads its arrays.

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
import re
import shutil
import tempfile
from typing import NamedTuple

import jax
import numpy as np

from jaxprune.errors import CheckpointError, InvalidArgumentError, JaxpruneError
from jaxprune.io.atomic import commit_directory
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

    Raises CheckpointError if `path` exists (unless `overwrite`) or cannot be written. Orbax writes
    inside a hidden temporary sibling that is then committed (`jaxprune.io.atomic`), so a failure,
    a full disk or a kill leaves nothing at `path` (or, with `overwrite`, the old checkpoint), and
    of two processes writing `path` at once one wins and the other gets a CheckpointError.
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
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"cannot write to {parent}: {e.strerror}") from None
    staged = os.path.join(tmp, "checkpoint")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(staged, args=args)
        commit_directory(staged, path, overwrite)
    except JaxpruneError:
        raise
    except Exception as e:   # OSError, or tensorstore's ValueError on a full disk
        raise CheckpointError(f"writing {path} failed: {_reason(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


_CAUSES = ("No space left on device", "File too large", "Disk quota exceeded", "Permission denied",
           "Read-only file system")


def _reason(e: Exception) -> str:
    """A short cause of a failed write: the OS's words when they are in the message (tensorstore
    wraps them in long paths), else the start of the message."""
    text = str(e)
    cause = next((c for c in _CAUSES if c in text), None)
    return cause if cause else f"{type(e).__name__}: {text[:300]}"


def _from_restored(restored, source: str) -> Checkpoint:
    from jaxprune.io.hf import checked_config
    if restored.get("config") is None or restored.get("params") is None:
        raise CheckpointError(f"{source}: not a jaxprune checkpoint (no params/config items)")
    config = checked_config(restored["config"], source=source)
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


MAX_JSON_BYTES = 64 << 20
ANY_RATIO_BELOW = 64 << 20   # arrays up to this many bytes are restored whatever their compression
MAX_RATIO = 1024             # larger ones must not claim more than this many bytes per byte on disk


def _disk_bytes(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


MAX_GATE_ARRAYS = 4096       # a gates item holds a few arrays per layer


_INDEX = re.compile(r"[0-9]{1,9}")


def _stored_keys(meta: dict, item_dir: str, source: str) -> dict[str, str]:
    """keystr path -> stored array name of a StandardSave item, from its `_METADATA` JSON `meta`
    (entries orbax marks `skip_deserialize`, empty nodes and None, hold no array and are left out)."""
    from jaxprune.io.untrusted import short
    tree = meta.get("tree_metadata")
    if not isinstance(tree, dict):
        raise CheckpointError(f"{source}: {os.path.basename(item_dir)}/_METADATA has no tree_metadata object")
    out = {}
    for entry in tree.values():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not keys or not all(
                isinstance(k, dict) and isinstance(k.get("key"), str) and k.get("key_type") in (1, 2) for k in keys):
            raise CheckpointError(f"{source}: {os.path.basename(item_dir)}/_METADATA holds a malformed "
                                  f"entry {short(entry)}")
        value = entry.get("value_metadata")
        if isinstance(value, dict) and value.get("skip_deserialize") is True:
            continue
        if any(k["key_type"] == 1 and not _INDEX.fullmatch(k["key"]) for k in keys):
            raise CheckpointError(f"{source}: {os.path.basename(item_dir)}/_METADATA holds a non-integer "
                                  f"list index in {short(entry)}")
        if any(not k["key"] or k["key"] in (".", "..") or any(c in k["key"] for c in "/\\\0") for k in keys):
            raise CheckpointError(f"{source}: {os.path.basename(item_dir)}/_METADATA names an array outside "
                                  f"its item: {short(entry)}")
        path = "".join(f"[{int(k['key'])}]" if k["key_type"] == 1 else f"[{k['key']!r}]" for k in keys)
        out[path] = ".".join(k["key"] for k in keys)
    return out


def _array_metadata(item_dir: str, source: str, expected: set | None = None) -> dict[str, tuple]:
    """keystr path -> (shape, dtype) of a StandardSave item, read from its metadata only.

    Each array's zarr header is opened through tensorstore one at a time and waited for, so a
    corrupt file fails here with nothing left running. (Orbax's own metadata reader gathers
    the opens on an asyncio loop; when one fails, it raises while the others are still in flight,
    and their completions later land on a closed loop, which crashed the process at random.)
    `expected` (the key paths the config implies) is checked before any array is opened; without
    it (gates) an item holds at most MAX_GATE_ARRAYS arrays."""
    import tensorstore as ts
    from jaxprune.io.untrusted import read_json_dict, short
    name = os.path.basename(item_dir)
    meta = read_json_dict(os.path.join(item_dir, "_METADATA"), "orbax _METADATA", MAX_JSON_BYTES)
    keys = _stored_keys(meta, item_dir, source)
    if expected is not None and set(keys) != expected:
        bad = sorted(set(keys) ^ expected)
        raise CheckpointError(f"{source}: {name}/ does not match the config ({len(bad)} arrays differ, "
                              f"e.g. {short(bad[:3], 200)})")
    if expected is None and len(keys) > MAX_GATE_ARRAYS:
        raise CheckpointError(f"{source}: {name}/ holds {len(keys)} arrays (at most {MAX_GATE_ARRAYS})")
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    use_ocdbt = meta.get("use_ocdbt")
    if not isinstance(use_ocdbt, bool):   # as orbax decides when the flag is absent
        use_ocdbt = os.path.exists(os.path.join(item_dir, "manifest.ocdbt"))
    base = {"driver": "file", "path": item_dir.rstrip(os.sep) + os.sep}   # a path, not a URL: '#', '|' kept
    out = {}
    for path, stored in keys.items():
        if use_ocdbt:
            kvstore = {"driver": "ocdbt", "base": base, "path": stored}
        else:
            kvstore = {"driver": "file", "path": os.path.join(item_dir, stored) + os.sep}
        try:
            array = ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True).result()
            shape, dtype = tuple(int(d) for d in array.shape), np.dtype(array.dtype.numpy_dtype)
        except Exception as e:
            raise CheckpointError(f"{source}: unreadable array metadata in {name}/ for {short(stored)} "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{source}: {name}/ holds a negative dimension")
        out[path] = (shape, dtype)
    return out


def _check_size(meta: dict, item_dir: str, source: str) -> int:
    claimed = sum(int(np.prod(s, dtype=object)) * dt.itemsize for s, dt in meta.values())
    disk = _disk_bytes(item_dir)
    if claimed > ANY_RATIO_BELOW and claimed > MAX_RATIO * disk:
        raise CheckpointError(f"{source}: {os.path.basename(item_dir)}/ claims {claimed} bytes of arrays "
                              f"from {disk} bytes on disk")
    return claimed


def _check_before_restore(path: str):
    """Everything orbax would trust, checked first: JSON files bounded in size and nesting, the
    config sane, and the stored arrays' shapes exactly those the config implies (masks too),
    with sizes that the bytes on disk can hold. Returns the config."""
    from jaxprune import models
    from jaxprune.io.hf import checked_config
    from jaxprune.io.untrusted import read_json, short

    for root, _, files in os.walk(path):
        for f in files:
            if f in ("_METADATA", "_sharding", "_CHECKPOINT_METADATA", "metadata", "process_0") or \
                    f.endswith(".json"):
                read_json(os.path.join(root, f), f"orbax file {f}", MAX_JSON_BYTES)
    config_file = os.path.join(path, "config", "metadata")
    config = checked_config(read_json(config_file, "config", 4 << 20, 32), config_file)
    expected = {jax.tree_util.keystr(p): tuple(s) for p, s in
                jax.tree_util.tree_flatten_with_path(models.shapes(config), is_leaf=models.is_shape)[0]}
    for item in ("params", "masks"):
        item_dir = os.path.join(path, item)
        if item == "masks" and not os.path.isdir(item_dir):
            continue
        meta = _array_metadata(item_dir, path, set(expected))
        if item == "params":
            _check_size(meta, item_dir, path)
        bad = sorted(k for k, (s, _) in meta.items() if s != expected[k])
        if bad:
            raise CheckpointError(f"{path}: {item}/ does not match the config ({len(bad)} arrays differ, "
                                  f"e.g. {short(bad[:3], 200)})")
    if os.path.isdir(os.path.join(path, "gates")):
        _check_size(_array_metadata(os.path.join(path, "gates"), path), os.path.join(path, "gates"), path)
    return config


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (or one step directory of a `CheckpointManager`
    saved with `checkpoint_args`): `Checkpoint(params, masks, gates, metadata)`. A corrupt or
    hostile checkpoint is a CheckpointError, raised before orbax allocates anything for it."""
    ocp = _ocp()
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: not a jaxprune orbax checkpoint (needs params/ and config/ items)")
    try:
        _check_before_restore(path)
    except CheckpointError as e:
        detail = str(e).replace(path + os.sep, "").replace(path + ": ", "")
        raise CheckpointError(f"{path}: cannot restore ({detail})") from None
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(path, args=_restore_args(path))
        return _from_restored(restored, path)
    except JaxpruneError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore ({type(e).__name__}: {str(e)[:300]})") from None


def restore_checkpoint(manager, step: int | None = None) -> Checkpoint:
    """Restore `step` (default: the latest) from an orbax `CheckpointManager` whose steps were saved
    with `checkpoint_args`."""
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise CheckpointError(f"{manager.directory}: no checkpoint for step {step} "
                              f"(steps: {list(manager.all_steps())})")
    try:
        restored = manager.restore(step)
        return _from_restored({k: restored[k] for k in restored.keys()}, f"{manager.directory} step {step}")
    except JaxpruneError:
        raise
    except Exception as e:
        raise CheckpointError(f"{manager.directory} step {step}: cannot restore ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None


__all__ = ["Checkpoint", "checkpoint_args", "is_checkpoint", "load_checkpoint", "restore_checkpoint",
           "save_checkpoint"]
