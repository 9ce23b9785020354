"""Scale: the 8-device suite (subprocess), two-process multi-host vs one process, and start-up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.parallel import distributed, multihost

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXPRUNE_") and k != "XLA_FLAGS"}
    env.update(JAXPRUNE_PROGRESS="0", **extra)
    return env


def test_eight_device_suite():
    """tests/multidevice under XLA_FLAGS=--xla_force_host_platform_device_count=8: masks on one and 8
    devices and a 4 x 2 mesh agree, user pmap/shard_map, sharded params, data-parallel structured
    utilities."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "multidevice")],
                       cwd=ROOT, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """Two local processes (gloo CPU collectives) over a 2 x 2 mesh whose "model" axis spans the
    processes: each loads only its half of every split weight; masks equal a one-process run."""
    cfg = jp.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    params = jp.init(cfg, jax.random.key(0))
    ckpt = jp.save(params, str(tmp_path / "model"))
    worker = os.path.join(HERE, "workers", "multihost_worker.py")

    ref = subprocess.run([sys.executable, worker, ckpt, str(tmp_path / "one.npz")], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, worker, ckpt, str(tmp_path / f"p{i}.npz")],
                              env=_env(JAXPRUNE_COORDINATOR=f"localhost:{port}", JAXPRUNE_NUM_PROCESSES="2",
                                       JAXPRUNE_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]

    one = np.load(tmp_path / "one.npz")
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    specs = jax.tree.leaves(distributed.param_specs(params, 2), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    own_half = sum(np.asarray(x).nbytes // (2 if "model" in tuple(s) else 1)
                   for x, s in zip(jax.tree.leaves(params), specs))
    assert int(one["bytes_read"]) == total and int(one["process_count"]) == 1
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        assert int(got["process_count"]) == 2 and bool(got["same_sharding"])
        assert int(got["bytes_read"]) == own_half < 0.7 * total       # only this process's shards were read
        for k in one.files:
            if k.startswith(("wanda", "magnitude", "sparsegpt_masks")):
                np.testing.assert_array_equal(got[k], one[k], err_msg=k)
            elif k.startswith("sparsegpt_params"):
                np.testing.assert_allclose(got[k], one[k], atol=1e-5, err_msg=k)


def test_initialize_is_a_no_op_without_a_coordinator(monkeypatch):
    for v in multihost.ENV.values():
        monkeypatch.delenv(v, raising=False)
    assert multihost.initialize() is False


def test_initialize_rejects_incomplete_settings(monkeypatch):
    monkeypatch.setenv("JAXPRUNE_COORDINATOR", "localhost:1")
    monkeypatch.delenv("JAXPRUNE_NUM_PROCESSES", raising=False)
    with pytest.raises(jp.InvalidArgumentError, match="number of processes"):
        multihost.initialize()
    with pytest.raises(jp.InvalidArgumentError, match="outside"):
        multihost.initialize(num_processes=2, process_id=2)


def test_mesh_shape_errors():
    with pytest.raises(jp.InvalidArgumentError, match="must divide"):
        distributed.make_mesh(model=jax.device_count() + 1)
    with pytest.raises(jp.InvalidArgumentError, match="must equal"):
        distributed.make_mesh(data=jax.device_count() + 1)


def test_one_device_mesh_gives_the_same_masks_with_named_shardings():
    cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    params = jp.init(cfg, jax.random.key(0))
    calib = np.asarray(jax.random.randint(jax.random.key(1), (4, 16), 0, 64))
    mesh = distributed.make_mesh()
    ref = jp.wanda(params, calib, 0.5)
    got = jp.wanda(params, calib, 0.5, mesh=mesh)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert isinstance(b.sharding, jax.sharding.NamedSharding)
