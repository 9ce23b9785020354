"""L0 structured pruning of SmolLM2-135M to 30% fewer non-embedding parameters vs Bonsai.

    python -m benchmarks.l0 [--steps 200] [--batch-size 4] [--seqlen 128] [--modes gates,weights]
                            [--skip-bonsai]

L0 (`jaxprune.l0_prune`): HardConcrete gates on heads, FFN channels, hidden dims and layers,
Lagrangian size target warmed up over half the steps, trained on random windows of emma +
mansfieldpark (seed 1); `--modes`: gates only, and/or gates and weights together. Bonsai: the
structured benchmark's settings (4 x 128 calibration windows, seed 0, 32 sub-models per round)
to the same target. Both are compacted and evaluated on the first 64 x 512 windows of
prideprejudice.
"""

from __future__ import annotations

import argparse
import time

import jax

import jaxprune as jp
from jaxprune.structured import units as structured
from benchmarks.common import machine, write_section

TARGET = 0.3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--modes", default="gates,weights", help="gates (weights frozen) and/or weights (trained too)")
    ap.add_argument("--skip-bonsai", action="store_true")
    ap.add_argument("--eval-windows", type=int, default=64)
    args = ap.parse_args()

    params, tok = jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m")
    texts = [jp.bundled_text(n) for n in jp.data.CALIBRATION_TEXTS]
    train = jp.calibration_windows(tok, texts, n=1024, seqlen=args.seqlen, seed=1)
    ev = jp.eval_windows(tok, jp.bundled_text(jp.data.EVALUATION_TEXT), seqlen=512, max_windows=args.eval_windows)
    dense_n = structured.non_embedding_params(params)
    dense = jp.perplexity(params, ev, seqlen=512)
    rows = []

    log = lambda r: print(f"step {r['step']}: data loss {r['data']:.3f}, expected size {r['expected']['size']:.3f} "
                             f"(target {r['target']['size']:.3f}), lambdas {r['lambdas']['size']}", flush=True)
    tokens = args.steps * args.batch_size * args.seqlen
    notes = []
    for mode in args.modes.split(","):
        t = time.perf_counter()
        res = jp.l0_prune(params, train, target=TARGET, steps=args.steps, batch_size=args.batch_size,
                          train_params=mode == "weights", key=jax.random.key(0), show_progress=True, callback=log,
                          log_every=10)
        seconds = time.perf_counter() - t
        small = jp.compact(res.params, res.gates)
        kept = ", ".join(f"{k} {float(v.sum()):.0f}/{v.size}" for k, v in sorted(res.gates.items()))
        name = "L0, gates only" if mode == "gates" else "L0, gates and weights"
        rows.append((name, jp.perplexity(small, ev, seqlen=512), 1 - structured.non_embedding_params(small) / dense_n,
                     seconds, f"{args.steps} steps x {args.batch_size} x {args.seqlen} = {tokens:,} tokens"))
        notes.append(f"{name}: units kept {kept}; last logged data losses "
                     + ", ".join(f"{h['data']:.2f}" for h in res.history[-5:]) + ", expected kept size "
                     + ", ".join(f"{h['expected']['size']:.3f}" for h in res.history[-5:]) + ".")
        print(rows[-1], notes[-1], flush=True)

    if not args.skip_bonsai:
        calib = jp.calibration_windows(tok, texts, n=4, seqlen=128, seed=0)
        t = time.perf_counter()
        b = jp.bonsai(params, calib, target=TARGET, n_samples=32, key=jax.random.key(0), show_progress=True)
        seconds = time.perf_counter() - t
        small_b = jp.compact(params, b.gates)
        rows.append(("Bonsai", jp.perplexity(small_b, ev, seqlen=512),
                     1 - structured.non_embedding_params(small_b) / dense_n, seconds,
                     f"{len(b.history)} rounds x 32 sub-models x 4 x 128 tokens"))
        print(rows[-1], flush=True)

    lines = [f"Machine: {machine()}.",
             f"SmolLM2-135M-Instruct (float32), target {TARGET:.0%} of {dense_n:,} non-embedding parameters; "
             f"dense perplexity {dense:.2f} on the first {ev.shape[0]} x 512 windows of prideprejudice. "
             f"L0: gates on heads, FFN channels, hidden dims and layers, `l0_optimizer()` defaults (Adam lr 0.1 "
             f"on the gates, plain ascent lr 20 on the lambdas, AdamW 2e-5 on the weights when trained), warm-up "
             f"over {args.steps // 2} steps, training windows from emma + mansfieldpark (seed 1).",
             "", "| method | removed | perplexity | time | data |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {r:.1%} | {p:.2f} | {s:.0f} s | {d} |" for n, p, r, s, d in rows]
    lines += [""] + notes
    text = "\n".join(lines)
    print(text)
    write_section("L0 structured pruning vs Bonsai on SmolLM2 (benchmarks/l0.py)", text)


if __name__ == "__main__":
    main()
