"""Orbax checkpoints of params + masks + gates: standalone and through a CheckpointManager."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxprune as jp


def tiny(dtype=jnp.float32):
    cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    return jax.tree.map(lambda x: x.astype(dtype), jp.init(cfg, jax.random.key(0)))


def same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b) and
            all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
                for x, y in zip(la, lb)))


def test_params_masks_gates_and_metadata_round_trip(tmp_path):
    params = tiny(ml_dtypes.bfloat16)
    masks = jp.magnitude(params, 0.5, pattern="2:4")
    gates = {"heads": jnp.array([[1.0, 0.0], [0.5, 1.0]]), "ffn": jnp.ones((2, 32)).at[0, 3].set(0.0)}
    path = jp.save_checkpoint(str(tmp_path / "ck"), params, masks=masks, gates=gates,
                              metadata={"step": 7, "method": "magnitude"})
    ck = jp.load_checkpoint(path)
    assert ck.params.config == params.config and same(ck.params, params)
    assert ck.masks.config == params.config and same(ck.masks, jax.tree.map(np.asarray, masks))
    assert same(ck.gates, gates) and ck.metadata == {"step": 7, "method": "magnitude"}
    # jp.load understands the directory too (float32 by default, stored dtype with dtype=None).
    assert same(jp.load(path, dtype=None), params)
    assert jax.tree.leaves(jp.load(path))[0].dtype == jnp.float32


def test_optional_parts_are_absent_and_existing_paths_are_kept(tmp_path):
    params = tiny()
    path = jp.save_checkpoint(str(tmp_path / "ck"), params)
    ck = jp.load_checkpoint(path)
    assert ck.masks is None and ck.gates is None and ck.metadata is None
    with pytest.raises(jp.CheckpointError, match="already exists"):
        jp.save_checkpoint(path, jax.tree.map(jnp.zeros_like, params))
    assert same(jp.load_checkpoint(path).params, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    jp.save_checkpoint(path, zeros, overwrite=True)
    assert same(jp.load_checkpoint(path).params, zeros)
    with pytest.raises(jp.InvalidArgumentError, match="shaped like params"):
        jp.save_checkpoint(str(tmp_path / "bad"), params, masks={"layers": []})
    with pytest.raises(jp.InvalidArgumentError, match="Params"):
        jp.save_checkpoint(str(tmp_path / "bad"), params.tree)
    with pytest.raises(jp.CheckpointError, match="not a jaxprune orbax checkpoint"):
        jp.load_checkpoint(str(tmp_path))
    assert not os.path.exists(tmp_path / "bad")


def test_masked_training_loop_with_a_checkpoint_manager(tmp_path):
    """A user's optax loop keeps the masks; the manager keeps the last two steps, which restore exactly."""
    params = tiny()
    masks = jp.magnitude(params, 0.5)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)
    opt = optax.chain(optax.adam(1e-2), jp.keep_masked(masks))
    state = opt.init(params)
    params = jp.apply_masks(params, masks)

    def loss(p):
        logits = jp.forward(p, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    saved = {}
    with ocp.CheckpointManager(str(tmp_path / "run"), options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
        for step in range(3):
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            mngr.save(step, args=jp.checkpoint_args(params, masks=masks, metadata={"loss": float(value)}))
            saved[step] = (params, float(value))
        mngr.wait_until_finished()
        assert list(mngr.all_steps()) == [1, 2]
    fresh = ocp.CheckpointManager(str(tmp_path / "run"))
    latest = jp.restore_checkpoint(fresh)
    assert same(latest.params, saved[2][0]) and latest.metadata == {"loss": saved[2][1]}
    assert same(jp.restore_checkpoint(fresh, step=1).params, saved[1][0])
    # Masked weights stayed zero through training and the checkpoint.
    k = np.asarray(latest.params["layers"][0]["mlp"]["up_proj"]["kernel"])
    assert not k[~np.asarray(latest.masks["layers"][0]["mlp"]["up_proj"]["kernel"])].any()
    with pytest.raises(jp.CheckpointError, match="no checkpoint for step 0"):
        jp.restore_checkpoint(fresh, step=0)


_TRUNCATED_MANIFEST = r"""
import sys, jax, jaxprune as jp
path = sys.argv[1]
for _ in range(5):
    try:
        jp.load_checkpoint(path)
    except jp.CheckpointError as e:
        print("refused:", "unreadable array metadata" in str(e))
"""


def test_a_corrupt_array_store_is_refused_with_nothing_left_running(tmp_path):
    """A truncated OCDBT manifest: CheckpointError, and no read of another array is still in
    flight afterwards (orbax's gathered metadata reads used to finish on a closed event loop,
    printing 'Event loop is closed' and at times crashing the process)."""
    import subprocess
    import sys
    params = tiny()
    path = jp.save_checkpoint(str(tmp_path / "ck"), params, masks=jp.magnitude(params, 0.5))
    manifest = os.path.join(path, "masks", "manifest.ocdbt")
    with open(manifest, "rb") as f:
        raw = f.read()
    with open(manifest, "wb") as f:
        f.write(raw[:len(raw) * 2 // 3])
    run = subprocess.run([sys.executable, "-c", _TRUNCATED_MANIFEST, path], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["refused:", "True"] * 5
    assert "Event loop is closed" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_odd_directory_names_load_and_hostile_array_names_are_refused(tmp_path):
    """A checkpoint under a directory named with '#', '|' and a space loads (the array store is
    opened by path, not by URL). Array names in `_METADATA` that are not integers where an index is
    due, or that leave the item ('..', '/'), are a CheckpointError before anything is read."""
    import json
    params = tiny()
    path = jp.save_checkpoint(str(tmp_path / "run #3|a" / "ck"), params)
    assert same(jp.load_checkpoint(path).params, params)
    meta_file = os.path.join(path, "params", "_METADATA")
    with open(meta_file) as f:
        meta = json.load(f)
    first = next(iter(meta["tree_metadata"]))
    for keys in ([{"key": "layers", "key_type": 2}, {"key": "\u00b2", "key_type": 1}],
                 [{"key": "layers", "key_type": 2}, {"key": "9" * 5000, "key_type": 1}],
                 [{"key": "..", "key_type": 2}], [{"key": "a/b", "key_type": 2}]):
        bad = json.loads(json.dumps(meta))
        bad["tree_metadata"][first]["key_metadata"] = keys
        with open(meta_file, "w") as f:
            json.dump(bad, f)
        with pytest.raises(jp.CheckpointError, match="_METADATA"):
            jp.load_checkpoint(path)
