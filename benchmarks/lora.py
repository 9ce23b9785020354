"""LoRA recovery of SmolLM2-135M after Wanda 2:4: perplexity before and after, gap closed.

    python -m benchmarks.lora [--steps 200] [--batch-size 4] [--seqlen 128] [--rank 8] [--lr 1e-3]

Wanda 2:4 with the one-shot protocol's calibration (32 x 512 windows of emma + mansfieldpark,
seed 0). LoRA adapters on every pruned linear (rank 8, alpha 16), trained with Adam on random
windows of the same two novels (seed 1), base weights and mask fixed; the merged model keeps the
2:4 pattern (checked here). Evaluation: the first 64 x 512 windows of prideprejudice.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import jaxprune as jp
from jaxprune.training.lora import lora_finetune, lora_merge
from benchmarks.common import machine, write_section


def two_four_holds(params, masks) -> bool:
    for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
        m = np.asarray(m)
        if m.ndim == 2 and not m.all():
            k = np.asarray(x)
            if np.any(k[~m] != 0) or np.any((k.reshape(-1, 4, k.shape[1]) != 0).sum(axis=1) > 2):
                return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--control", action="store_true",
                    help="also train the same adapters on the dense model (how much is adaptation to the text)")
    args = ap.parse_args()

    params, tok = jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m")
    texts = [jp.bundled_text(n) for n in jp.data.CALIBRATION_TEXTS]
    calib = jp.calibration_windows(tok, texts, n=32, seqlen=512, seed=0)
    train = jp.calibration_windows(tok, texts, n=1024, seqlen=args.seqlen, seed=1)
    ev = jp.eval_windows(tok, jp.bundled_text(jp.data.EVALUATION_TEXT), seqlen=512, max_windows=args.eval_windows)

    dense = jp.perplexity(params, ev, seqlen=512)
    masks = jp.wanda(params, calib, sparsity=0.5, pattern="2:4")
    pruned = jp.apply_masks(params, masks)
    before = jp.perplexity(pruned, ev, seqlen=512)
    print(f"dense {dense:.2f}, Wanda 2:4 {before:.2f}", flush=True)

    t = time.perf_counter()
    res = lora_finetune(pruned, train, masks=masks, rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                        optimizer=optax.adam(args.lr), key=jax.random.key(0), show_progress=True,
                        callback=lambda r: print(f"step {r['step']}: loss {r['loss']:.3f}", flush=True))
    seconds = time.perf_counter() - t
    merged = lora_merge(pruned, res.adapters, masks)
    after = jp.perplexity(merged, ev, seqlen=512)
    closed = (before - after) / (before - dense)
    control = None
    if args.control:
        ctl = lora_finetune(params, train, rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                            optimizer=optax.adam(args.lr), key=jax.random.key(0), show_progress=True)
        control = jp.perplexity(lora_merge(params, ctl.adapters), ev, seqlen=512)
    n_adapter = sum(int(np.size(x)) for x in jax.tree.leaves(res.adapters))
    tokens = args.steps * args.batch_size * args.seqlen
    lines = [f"Machine: {machine()}.",
             f"SmolLM2-135M-Instruct (float32); Wanda 2:4 from 32 x 512 calibration windows (emma + "
             f"mansfieldpark, seed 0); LoRA rank {args.rank} (alpha 16) on all {len(res.adapters)} pruned "
             f"linears ({n_adapter:,} adapter parameters), Adam lr {args.lr:g}, {args.steps} steps x "
             f"{args.batch_size} x {args.seqlen} tokens = {tokens:,} training tokens drawn from 1,024 windows "
             f"of the same novels (seed 1); evaluation: first {ev.shape[0]} x 512 windows of prideprejudice.",
             "", "| model | perplexity |", "|---|---|",
             f"| dense | {dense:.2f} |", f"| Wanda 2:4 | {before:.2f} |",
             f"| Wanda 2:4 + LoRA (merged) | {after:.2f} |"]
    if control is not None:
        lines.append(f"| dense + LoRA, same recipe (control) | {control:.2f} |")
    lines += ["",
              f"Gap to dense closed: **{closed:.1%}**; training {seconds:.0f} s ({seconds / args.steps:.2f} s/step); "
              f"2:4 pattern of the merged weights intact: {two_four_holds(merged, masks)}.",
              "Training loss (every 10 steps): " + ", ".join(f"{r['loss']:.2f}" for r in res.history) + "."]
    text = "\n".join(lines)
    print(text)
    write_section("LoRA recovery after Wanda 2:4 on SmolLM2 (benchmarks/lora.py)", text)


if __name__ == "__main__":
    main()
