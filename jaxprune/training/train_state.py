"""Resumable training state on orbax: one `CheckpointManager` step per checkpoint.

A step directory holds the items of `jaxprune.io.checkpoints.checkpoint_args` — the model at
that step (`params`, `config`), its `masks`, and JSON `metadata` (the step, the history so far,
the run's settings) — plus `train_state`: the trainable pytree (full weights or LoRA adapters)
and the optimizer state. So `jp.load_checkpoint(step_dir)` opens any step as a model, and
`restore_latest` gives a loop everything it needs to continue exactly where it stopped.
Orbax commits a step by renaming its temporary directory, so a run killed mid-write leaves the
previous step intact.

Example:
    >>> import jax, jax.numpy as jnp, optax, tempfile, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=1, num_attention_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> tx = optax.adam(1e-3)
    >>> state = {"trainable": params.tree, "opt_state": tx.init(params.tree)}
    >>> d = tempfile.mkdtemp()
    >>> with open_manager(d) as mngr:
    ...     save_state(mngr, 3, params, state, {"step": 3, "settings": {"lr": 1e-3}})
    >>> with open_manager(d) as mngr:
    ...     step, state2, meta = restore_latest(mngr, state)
    >>> step, meta["settings"], type(state2["opt_state"][0]).__name__
    (3, {'lr': 0.001}, 'ScaleByAdamState')
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxprune.core.params import Params
from jaxprune.errors import CheckpointError
from jaxprune.io.checkpoints import checkpoint_args

__all__ = ["open_manager", "restore_latest", "save_state"]


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def open_manager(directory: str, max_to_keep: int = 2):
    """An orbax `CheckpointManager` over `directory` (created if needed), keeping the last
    `max_to_keep` steps; use it as a context manager (or call `.close()`)."""
    ocp = _ocp()
    directory = os.path.abspath(os.fspath(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise CheckpointError(f"cannot write checkpoints to {directory}: permission denied")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))


def save_state(manager, step: int, params: Params, state: dict, metadata: dict, masks=None) -> None:
    """Save step `step`: the model `params` (+ `masks`), JSON `metadata` and the pytree `state`
    (e.g. ``{"trainable": ..., "opt_state": ...}``). Orbax copies the arrays before returning and
    writes in the background; `manager.wait_until_finished()` (or closing it) waits for it."""
    ocp = _ocp()
    base = checkpoint_args(params, masks=masks, metadata=metadata)
    items = {k: base[k] for k in base.keys()}
    items["train_state"] = ocp.args.StandardSave(state)
    manager.save(int(step), args=ocp.args.Composite(**items))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def restore_latest(manager, state_like: dict):
    """(step, state, metadata) of the latest committed step, or None when there is none.

    `state_like` gives the structure, shapes and dtypes to restore into (the
    optimizer state comes back as the optimizer's own NamedTuples); a mismatch (a checkpoint of
    another model or another optimizer) raises CheckpointError."""
    ocp = _ocp()
    step = manager.latest_step()
    if step is None:
        return None
    args = ocp.args.Composite(train_state=ocp.args.StandardRestore(_abstract(state_like)),
                              metadata=ocp.args.JsonRestore())
    try:
        restored = manager.restore(step, args=args)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manager.directory} step {step}: cannot restore the training state "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    state, meta = restored["train_state"], restored["metadata"]
    if state is None or meta is None:
        raise CheckpointError(f"{manager.directory} step {step}: not a training checkpoint (no train_state)")
    if jax.tree.structure(state) != jax.tree.structure(state_like):
        raise CheckpointError(f"{manager.directory} step {step}: the saved training state has another structure")
    return int(step), state, meta
