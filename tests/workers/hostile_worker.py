"""Subprocess side of tests/test_hostile_files.py: load every case of the hostile corpus.

    python hostile_worker.py CORPUS_DIR RESULTS.json

CORPUS_DIR is a copy of tests/fixtures/hostile/corpus (written by make_corpus.py). Each case is
read by the loader of its kind in a child forked from this process (tests/workers/forkrun.py):
its outcome (error type and message), seconds and peak resident memory above the child's start
go to RESULTS.json as {"ID": {...}}; GGUF cases are also loaded through `jp.load`, as "ID@load".
A child is killed after 5 s or 1 GiB (reported as "timeout" / "memory").
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "fixtures", "hostile"))

if __name__ == "__main__":
    os.environ.setdefault("JAXPRUNE_PROGRESS", "0")
    corpus, results_path = sys.argv[1:3]
    import numpy as np

    import jaxprune as jp
    from jaxprune.io.gguf_check import check_gguf
    from jaxprune.oneshot.streaming import prune_streaming
    import make_corpus
    from forkrun import run_forked
    import orbax.checkpoint  # noqa: F401  (imported once here, not in every child)
    import tokenizers  # noqa: F401
    import gguf  # noqa: F401

    base = os.path.join(corpus, "base-hf")
    loaders = {
        "hf": jp.load,
        "gguf": check_gguf,
        "gguf-load": jp.load,
        "tokenizer": jp.tokenizer,
        "orbax": jp.load_checkpoint,
        "compressed": jp.load_compressed,
        "stream": lambda d: prune_streaming(base, os.path.join(d, "out"), np.zeros((1, 4), np.int32), "wanda",
                                            show_progress=False),
    }
    results = {"base-hf": run_forked(lambda: jp.load(base) and None, timeout=30)}
    for case_id, kind, _, _, _ in make_corpus.CASES:
        path = make_corpus.case_path(corpus, case_id, kind)
        results[case_id] = run_forked(lambda: loaders[kind](path) and None, timeout=5)
        if kind == "gguf":
            results[case_id + "@load"] = run_forked(lambda: jp.load(path) and None, timeout=5)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
