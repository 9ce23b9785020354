"""One process of the two-process test (tests/test_distributed.py), or the single-process reference.

    python multihost_worker.py CHECKPOINT OUT.npz            # reference: one process, 4 devices
    JAXPRUNE_COORDINATOR=localhost:PORT JAXPRUNE_NUM_PROCESSES=2 JAXPRUNE_PROCESS_ID=i \\
        python multihost_worker.py CHECKPOINT OUT.npz         # process i of 2, 2 devices each

Both build a 2 x 2 ("data", "model") mesh; with two processes, each process's devices form
one "model" column, so each process loads (and holds) only its half of every split weight.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    multi = bool(os.environ.get("JAXPRUNE_COORDINATOR"))
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 if multi else 4}"
    os.environ.setdefault("JAXPRUNE_PROGRESS", "0")
    checkpoint, out = sys.argv[1], sys.argv[2]

    from jaxprune.parallel import distributed, loading, multihost
    assert multihost.initialize() == multi   # reads JAXPRUNE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID

    import jax
    import numpy as np
    import jaxprune as jp

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    # [[p0d0, p1d0], [p0d1, p1d1]] with two processes: "model" spans processes, "data" stays within
    mesh = distributed.make_mesh(data=2, model=2, devices=np.asarray(devices).reshape(2, 2).T.ravel())
    read = {}   # distinct slices this process read: (path, index) -> bytes
    params = loading.load_sharded(checkpoint, mesh,
                                      on_read=lambda path, index, n: read.__setitem__((path, str(index)), n))
    cfg = params.config
    calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 32))   # the same on every process

    wanda = jp.wanda(params, calib, 0.5)
    wanda_nm = jp.wanda(params, calib, 0.5, pattern="2:4", mode="as-you-go")
    magnitude = jp.magnitude(params, 0.5)
    new_params, sgpt = jp.sparsegpt(params, calib, 0.5, blocksize=32)
    same_sharding = all(m.sharding == p.sharding for m, p in zip(jax.tree.leaves(wanda), jax.tree.leaves(params)))

    results = {}
    for name, tree in (("wanda", wanda), ("wanda_nm", wanda_nm), ("magnitude", magnitude),
                       ("sparsegpt_masks", sgpt), ("sparsegpt_params", new_params)):
        for i, leaf in enumerate(distributed.gather(jax.tree.leaves(tree))):
            results[f"{name}/{i}"] = leaf
    results["bytes_read"] = np.asarray(sum(read.values()))
    results["same_sharding"] = np.asarray(same_sharding)
    results["process_count"] = np.asarray(jax.process_count())
    np.savez(out, **results)
    if multi:
        jax.distributed.shutdown()
