"""Subprocess side of tests/test_streaming.py.

    python stream_worker.py prune SOURCE OUT CALIB.npy METHOD [STOP_AFTER]
        streams; after layer STOP_AFTER is committed it prints "committed K" and waits to be killed
    python stream_worker.py rss SOURCE OUT CALIB.npy
        streams Wanda and prints a JSON line: resident size before (after start-up) and peak resident
        size during the run (Linux VmHWM, reset at the start), layer and activation bytes
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

if __name__ == "__main__":
    os.environ.setdefault("JAXPRUNE_PROGRESS", "0")
    cmd, source, out, calib_path = sys.argv[1:5]
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxprune.oneshot import streaming
    from jaxprune.io.hf import read_config

    calib = np.load(calib_path)
    if cmd == "prune":
        stop = int(sys.argv[6]) if len(sys.argv) > 6 else None

        def on_layer(i):
            if i == stop:
                print(f"committed {i}", flush=True)
                time.sleep(600)   # the test kills us here

        streaming.prune_streaming(source, out, calib, sys.argv[5], 0.5, on_layer=on_layer, blocksize=32)
    elif cmd == "rss":
        def status(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

        jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()   # the runtime itself, before any weights
        gc.collect()
        baseline = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # reset the peak (VmHWM) to the current size: the start-up spike is not ours
        cfg = read_config(source)
        t0 = time.perf_counter()
        streaming.return_freed_memory()   # explicit: the library never tunes the allocator itself
        streaming.prune_streaming(source, out, calib, "wanda", 0.5, batch_size=calib.shape[0])
        peak = status("VmHWM")
        acts = calib.size * cfg.hidden_size * 4
        masks = streaming.load_masks(out)
        kept = {}
        for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
            name = jax.tree_util.keystr(p)
            if "layers" in name and "kernel" in name:
                kept[name] = float(np.mean(m))
        print(json.dumps({"kept": kept, "baseline": baseline, "peak": peak, "layer": streaming.layer_bytes(cfg, jnp.bfloat16),
                          "activations": acts, "layers": cfg.num_hidden_layers,
                          "seconds": time.perf_counter() - t0}), flush=True)
