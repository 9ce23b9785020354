"""Subprocess side of tests/test_write_faults.py: writers killed, starved of disk, or racing.

    python write_fault_worker.py ROOT SEED

Writes under ROOT and prints one JSON line of outcomes. Every write runs in a child forked from
this process (tests/workers/forkrun.py), which never starts JAX's runtime itself (params are
numpy arrays), so each child starts at once. For each writer (`WRITERS`: the compressed format,
a Hugging Face directory via `jp.save`, an orbax checkpoint, a report):

- ``kill``: a child writes ROOT/kill/W/dest-K and is SIGKILLed after a random delay (up to 1.5 x
  the time one write takes), `KILLS` times; ``overwrite-kill`` the same over an existing
  destination (ROOT/overwrite-kill/W/dest-K holds variant 0, the child writes variant 1);
- ``rename-kill``: the child SIGKILLs itself right after the first rename (or exchange) that
  touches an existing destination it is overwriting (the worst moment of a commit);
- ``disk``: the child's file size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG)
  is set to each of `LIMITS[W]` bytes before it writes ROOT/disk/W/L/dest;
- ``race``: two children, both warmed up, are released together to write variants 0 and 1 to
  ROOT/race/W/free; for ROOT/race/W/held each also stops at its first temporary directory until
  both are there, then the first finishes before the second goes on (so the second has passed
  its "already exists" check at the start but commits after the first: the worst race).
ROOT/ref/W-V holds a complete write of variant V, for comparison. Streaming (``stream``): two runs
race for one output (the winner is the reference), then a run is SIGKILLed at a random point
(the test resumes it in-process).
"""

from __future__ import annotations

import gc
import json
import os
import random
import resource
import select
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

WRITERS = ("compressed", "hf", "orbax", "report")
KILLS = {"compressed": 8, "hf": 8, "orbax": 5, "report": 3}            # random SIGKILLs of a new write
OVERWRITE_KILLS = {"compressed": 4, "hf": 4, "orbax": 3}               # ... of a write over an old one
LIMITS = {"compressed": (0, 20_000), "hf": (0, 20_000), "orbax": (0, 20_000), "report": (20_000,)}
BARRIERS = {"compressed": (False, True), "hf": (False, True), "orbax": (False, True), "report": (True,)}


def numpy_models():
    """Two variants of a small pruned Llama (numpy arrays: no JAX runtime) and their masks."""
    import jax
    import numpy as np
    import jaxprune as jp
    from jaxprune import models
    from jaxprune.core.params import Params

    cfg = jp.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    out = []
    for v in (0, 1):
        rng = np.random.default_rng(v)
        tree = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s)).astype(np.float32), models.shapes(cfg),
                            is_leaf=models.is_shape)
        keep = jax.tree_util.tree_map_with_path(
            lambda p, w: rng.random(w.shape) < 0.5 if "layers" in jax.tree_util.keystr(p) and w.ndim == 2
            else np.ones(w.shape, bool), tree)
        pruned = jax.tree.map(lambda w, k: np.where(k, w, 0).astype(np.float32), tree, keep)
        out.append((Params(cfg, pruned), Params(cfg, keep)))
    return out


def report_runs(root: str) -> list[str]:
    runs = []
    for v in (0, 1):
        d = os.path.join(root, f"run-{v}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "report.json"), "w") as f:   # one plot (perplexity.png) + report.md
            json.dump({"method": "wanda", "model": f"tiny-{v}", "sparsity": 0.5, "pattern": None, "seed": v,
                       "perplexity": {"dense": 10.0, "pruned": 12.0 + v}}, f)
        runs.append(d)
    return runs


def main(root: str, seed: int) -> dict:
    import jax
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import orbax.checkpoint  # noqa: F401

    import jaxprune as jp
    import jaxprune.report  # noqa: F401
    from jaxprune.io import atomic
    from jaxprune.oneshot.streaming import prune_streaming
    from forkrun import collect, spawn, wait_ready
    from jax._src import xla_bridge

    cache = os.path.join(root, "jax-cache")   # the streaming children compile once between them
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    rnd = random.Random(seed)
    variants = numpy_models()
    runs = report_runs(os.path.join(root, "runs"))
    gc.freeze()   # the children's gc.collect calls (streaming makes many) skip everything imported here

    def write(kind, dest, v, overwrite=False):
        params, masks = variants[v]
        if kind == "compressed":
            jp.save_compressed(params, dest, masks=masks, overwrite=overwrite)
        elif kind == "hf":
            jp.save(params, dest, masks=masks, overwrite=overwrite)
        elif kind == "orbax":
            jp.save_checkpoint(dest, params, masks=masks, overwrite=overwrite)
        else:
            jp.report.render(runs[v], dest)

    scratch = os.path.join(root, "scratch")
    os.makedirs(scratch)

    def warm(kind):
        def setup():
            d = os.path.join(scratch, f"warm-{os.getpid()}")
            write(kind, d, 0)
            shutil.rmtree(d)
        return setup

    def child(fn, setup, kill_at=None, timeout=120):
        assert not xla_bridge.backends_are_initialized(), "this process must not start JAX's runtime"
        pid, r = spawn(fn, setup)
        return collect(pid, r, timeout, kill_at=kill_at)

    def race(fn, setup, barrier=False, timeout=120):
        """fn(0) and fn(1) in two children released together; with `barrier`, each child also stops
        at its first `tempfile.mkdtemp` until both have got there, and the second goes on only
        when the first has finished (it has passed its "already exists" check, but commits last)."""
        go = [os.pipe() for _ in range(2)]
        at_commit, resume = os.pipe(), [os.pipe() for _ in range(2)]

        def racer(v):
            if barrier:
                real_mkdtemp = tempfile.mkdtemp

                def mkdtemp(*args, **kw):
                    tempfile.mkdtemp = real_mkdtemp
                    os.write(at_commit[1], b"c")
                    os.read(resume[v][0], 1)
                    return real_mkdtemp(*args, **kw)
                tempfile.mkdtemp = mkdtemp
            os.read(go[v][0], 1)
            fn(v)

        kids = [spawn(lambda v=v: racer(v), setup) for v in (0, 1)]
        for _, r in kids:
            wait_ready(r)
        for _, w in go:
            os.write(w, b"g")
        if barrier:   # both past their start; the first finishes before the second goes on
            got = 0
            while got < 2:
                ready, _, _ = select.select([at_commit[0]], [], [], 60)
                if not ready:
                    break
                got += len(os.read(at_commit[0], 2))
            res = []
            for (pid, r), (_, w) in zip(kids, resume):
                os.write(w, b"r")
                res.append(collect(pid, r, timeout, started=True))
        else:
            res = [collect(pid, r, timeout, started=True) for pid, r in kids]
        for fds in go + resume + [at_commit]:
            for fd in fds:
                os.close(fd)
        return res

    out = {"kill": {}, "overwrite-kill": {}, "rename-kill": {}, "disk": {}, "race": {}, "ref": {}, "seconds": {}}
    clock = time.monotonic()

    def lap(name):
        nonlocal clock
        out["seconds"][name] = round(time.monotonic() - clock, 2)
        clock = time.monotonic()
    for kind in ("compressed", "hf", "report"):   # numpy only: warm up here, once
        write(kind, os.path.join(scratch, f"warm-{kind}"), 0)
    for kind in WRITERS:
        for v in (0, 1):
            res = child(lambda: write(kind, os.path.join(root, "ref", f"{kind}-{v}"), v), warm(kind))
            assert res["ok"], res
            out["ref"][f"{kind}-{v}"] = res
        lap(f"{kind} refs")
        seconds = max(out["ref"][f"{kind}-0"]["seconds"], 0.005)
        for mode, counts in (("kill", KILLS), ("overwrite-kill", OVERWRITE_KILLS)):
            if kind not in counts:
                continue   # a report re-rendered into an existing directory replaces file by file
            rows = out[mode][kind] = []
            for k in range(counts[kind]):
                dest = os.path.join(root, mode, kind, f"dest-{k}")
                if mode == "overwrite-kill":
                    shutil.copytree(os.path.join(root, "ref", f"{kind}-0"), dest, symlinks=True)
                delay = rnd.uniform(0, 1.5 * seconds)
                res = child(lambda: write(kind, dest, 1 if mode == "overwrite-kill" else 0, overwrite=True),
                            warm(kind), kill_at=delay)
                rows.append({"dest": dest, "delay": delay, "write_seconds": seconds, **res})
        lap(f"{kind} kills")
        if kind != "report":
            dest = os.path.join(root, "rename-kill", kind, "dest")
            shutil.copytree(os.path.join(root, "ref", f"{kind}-0"), dest, symlinks=True)

            def kill_after_touching(dest=dest, kind=kind):
                warm(kind)()
                real_rename, real_exchange = os.rename, atomic.exchange

                def rename(a, b, *args, **kw):
                    real_rename(a, b, *args, **kw)
                    if dest in (os.fspath(a), os.fspath(b)):
                        os.kill(os.getpid(), signal.SIGKILL)

                def exchange(a, b):
                    done = real_exchange(a, b)
                    if done and dest in (a, b):
                        os.kill(os.getpid(), signal.SIGKILL)
                    return done
                os.rename, atomic.exchange = rename, exchange

            res = child(lambda: write(kind, dest, 1, overwrite=True), kill_after_touching)
            out["rename-kill"][kind] = {"dest": dest, **res}
        lap(f"{kind} rename-kill")
        out["disk"][kind] = []
        for limit in LIMITS[kind]:
            parent = os.path.join(root, "disk", kind, str(limit))
            os.makedirs(parent)

            def starve(limit=limit, kind=kind):
                warm(kind)()
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

            res = child(lambda: write(kind, os.path.join(parent, "dest"), 0), starve)
            out["disk"][kind].append({"parent": parent, "limit": limit, **res})
        lap(f"{kind} disk")
        out["race"][kind] = []
        for barrier in BARRIERS[kind]:
            dest = os.path.join(root, "race", kind, "held" if barrier else "free")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            out["race"][kind].append({"dest": dest, "barrier": barrier,
                                      "results": race(lambda v, dest=dest, kind=kind: write(kind, dest, v), warm(kind),
                                                      barrier)})

        lap(f"{kind} race")

    # ---- streaming: two runs race for one output (the winner is the reference for the test), then a
    # run is killed at a random point (tests/test_write_faults.py resumes it in-process)
    src = os.path.join(root, "stream", "source")
    params = variants[0][0]
    small = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    from jaxprune.core.params import Params
    from jaxprune import models
    rng = np.random.default_rng(2)
    jp.save(Params(small, jax.tree.map(lambda s: (0.1 * rng.standard_normal(s)).astype(np.float32),
                                       models.shapes(small), is_leaf=models.is_shape)), src)
    calib = rng.integers(0, 64, (2, 16)).astype(np.int32)
    np.save(os.path.join(root, "stream", "calib.npy"), calib)

    def stream(dest):
        prune_streaming(src, dest, calib, "wanda", 0.5, show_progress=False)

    race_dest = os.path.join(root, "stream", "race")
    out["stream"] = {"source": src, "calib": os.path.join(root, "stream", "calib.npy"),
                     "race": {"dest": race_dest, "results": race(lambda v: stream(race_dest), None, timeout=300)}}
    lap("stream race")
    estimate = max(r["seconds"] for r in out["stream"]["race"]["results"])
    for attempt in range(6):   # a run that finished before its kill is retried with its own time as the estimate
        dest = os.path.join(root, "stream", f"killed-{attempt}")
        delay = rnd.uniform(0.2, 0.8) * estimate
        res = child(lambda: stream(dest), None, kill_at=delay, timeout=300)
        out["stream"]["killed"] = {"dest": dest, "delay": delay, "attempt": attempt, **res}
        if not res["ok"] and not os.path.lexists(dest):
            break
        # finished before its kill, or committed its output and was killed on its way out (CI saw a
        # kill 0.62 s in land after the commit): retry sooner
        estimate = min(res["seconds"], delay)
    lap("stream kill")
    return out


if __name__ == "__main__":
    os.environ.setdefault("JAXPRUNE_PROGRESS", "0")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))), flush=True)
