"""Subprocess side of tests/test_distill.py's kill-and-resume test.

    python distill_worker.py CHECKPOINT_DIR
        runs `problem()`'s distillation with checkpoints in CHECKPOINT_DIR, slowed down by its
        callback (0.25 s per step, then a long sleep after step 10) so the test can SIGKILL it at
        an arbitrary point after a checkpoint was committed; never finishes on its own.

`problem()` is also imported by the test, so both sides build the same student, teacher, data
and arguments from fixed seeds.
"""

from __future__ import annotations

import os
import sys
import time


def problem() -> tuple[tuple, dict]:
    """(student, teacher, calib), keyword arguments: a masked student, top-k teacher logits,
    held-out evaluation, 16 steps with a checkpoint every 4."""
    import jax
    import numpy as np

    import jaxprune as jp
    cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    teacher = jax.tree.map(lambda x: x * 4 if x.ndim == 2 else x, jp.init(cfg, jax.random.key(0)))
    calib = np.asarray(jax.random.randint(jax.random.key(1), (12, 16), 0, 64), np.int32)
    def keep(path, w):       # half of every block kernel (numpy: nothing to compile)
        w = np.asarray(w)
        if path[0].key != "layers" or w.ndim != 2:
            return np.ones(w.shape, bool)
        return np.abs(w) >= np.median(np.abs(w))

    masks = jax.tree_util.tree_map_with_path(keep, teacher)
    kw = dict(key=jax.random.key(7), steps=16, batch_size=2, masks=masks, teacher_top_k=8, lr=3e-3,
              eval_calib=calib[10:], eval_every=4, checkpoint_every=4, log_every=1, show_progress=False)
    return (teacher, teacher, calib[:10]), kw


if __name__ == "__main__":
    os.environ.setdefault("JAXPRUNE_PROGRESS", "0")
    from jaxprune.training.distill import distill

    def slow(record):
        time.sleep(0.25)
        if record["step"] >= 10:
            print(f"step {record['step']}: waiting to be killed", flush=True)
            time.sleep(600)

    (student, teacher, calib), kw = problem()
    distill(student, teacher, calib, checkpoint_dir=sys.argv[1], callback=slow, **kw)
    print("finished (the test should have killed this run)", flush=True)
