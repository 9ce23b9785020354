"""Structured pruning of SmolLM2-135M: prior alone vs Bonsai vs FinerCut, compaction speed-ups.

    python -m benchmarks.structured [--samples 32] [--n-calib 4] [--calib-seqlen 128]
    python -m benchmarks.structured --quick        # vmap-vs-loop throughput only

Calibration from emma + mansfieldpark (`jaxprune.calibration_windows`, seed 0), evaluation:
the first 64 x 512 windows of prideprejudice. One Bonsai run (and one prior-only run) to 50%
of non-embedding parameters passes through 20% and 30% (rounds of 5%), so the models at
every level come from the same run; FinerCut's removal order is cut at the first depth that
removes at least as many parameters. Each model is compacted, evaluated, and its forward
throughput compared with the dense model's on the same batch.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune.structured import units as structured
from jaxprune.structured.utility import evaluate, perplexity_utility
from benchmarks.common import best_of, machine, write_section

LEVELS = (0.2, 0.3, 0.5)


def vmap_vs_loop(params, calib, n_models=16, batch_size=8):
    """Seconds per sub-model: one jitted lax.map over vmapped batches vs a Python loop of the
    same jitted single-model utility (same gates, same windows)."""
    u = perplexity_utility(calib)
    cfg = params.config
    key = jax.random.key(0)
    g = {"heads": jax.random.bernoulli(key, 0.9, (n_models, cfg.num_hidden_layers, cfg.num_attention_heads)).astype(jnp.float32),
         "ffn": jax.random.bernoulli(key, 0.9, (n_models, cfg.num_hidden_layers, cfg.intermediate_size)).astype(jnp.float32)}
    evaluate(u, params, g, batch_size=batch_size)  # compile
    t_vmap = best_of(lambda: evaluate(u, params, g, batch_size=batch_size), 2)
    single = jax.jit(u)
    one = lambda i: jax.tree.map(lambda x: x[i], g)
    single(params, one(0)).block_until_ready()
    t_loop = best_of(lambda: [single(params, one(i)).block_until_ready() for i in range(n_models)], 2)
    a = evaluate(u, params, g, batch_size=batch_size)
    b = np.array([float(single(params, one(i))) for i in range(n_models)])
    return t_vmap / n_models, t_loop / n_models, float(np.max(np.abs(a - b) / np.abs(b)))


def snapshot_at(history, level, tolerance=0.005):
    """Gates of the first round within `tolerance` of `level` or past it (rounds may stop a
    fraction of a percent short: a query head's share of its K/V group is freed only with the group)."""
    for r in history:
        if r["removed_fraction"] >= level - tolerance:
            return {k: jnp.asarray(v) for k, v in r["gates"].items()}, r
    raise RuntimeError(f"run stopped before {level}")


def tokens_per_s(params, tokens):
    jp.forward(params, tokens).block_until_ready()
    return tokens.size / best_of(lambda: jp.forward(params, tokens).block_until_ready(), 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--n-calib", type=int, default=4)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--finercut-calib", type=int, default=2,
                    help="FinerCut calibration windows (a full step costs one forward per sublayer)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default="prior,bonsai,finercut", help="comma-separated subset to run")
    args = ap.parse_args()

    params = jp.load("smollm2-135m")
    tok = jp.tokenizer("smollm2-135m")
    calib = jp.calibration_windows(tok, [jp.bundled_text(n) for n in jp.data.CALIBRATION_TEXTS],
                                   n=args.n_calib, seqlen=args.calib_seqlen, seed=0)
    ev = jp.eval_windows(tok, jp.bundled_text(jp.data.EVALUATION_TEXT), seqlen=512, max_windows=args.eval_windows)
    lines = [f"Machine: {machine()}.",
             f"SmolLM2-135M-Instruct (float32); calibration {calib.shape[0]} x {calib.shape[1]} tokens "
             f"(emma + mansfieldpark, seed 0), which is also the sub-model utility (negative log-perplexity); "
             f"evaluation: first {ev.shape[0]} x 512 windows of prideprejudice."]

    per_vmap, per_loop, rel = vmap_vs_loop(params, calib)
    lines += ["", f"Sub-model evaluation ({calib.shape[0]} x {calib.shape[1]} tokens each, 16 random sub-models): "
              f"vmapped lax.map (8 per batch) {per_vmap:.3f} s/sub-model, Python loop over the same jitted "
              f"forward {per_loop:.3f} s/sub-model: **{per_loop / per_vmap:.2f}x** (max relative difference {rel:.1e})."]
    print(lines[-1], flush=True)
    if args.quick:
        print("\n".join(lines))
        return

    methods = args.methods.split(",")
    dense_n = structured.non_embedding_params(params)
    runs, seconds = {}, {}
    t = time.perf_counter()
    if "prior" in methods:
        runs["prior"] = jp.bonsai(params, calib, target=max(LEVELS), n_samples=0, show_progress=True).history
        seconds["prior"] = time.perf_counter() - t
    t = time.perf_counter()
    log = lambda r: print(f"bonsai round {r['round'] + 1}: {r['removed_fraction']:.3f} removed, "
                          f"{r['seconds']:.0f}s, utility mean {r.get('utility_mean', 0):.1f}", flush=True)
    if "bonsai" in methods:
        runs["bonsai"] = jp.bonsai(params, calib, target=max(LEVELS), n_samples=args.samples,
                                   key=jax.random.key(0), show_progress=True, callback=log).history
        seconds["bonsai"] = time.perf_counter() - t
    t = time.perf_counter()
    fc = None
    if "finercut" in methods:
        fc = jp.finercut(params, calib[:args.finercut_calib], target=max(LEVELS), show_progress=True)
        seconds["finercut"] = time.perf_counter() - t

    dense_ppl = jp.perplexity(params, ev, seqlen=512)
    speed_tokens = jnp.asarray(ev[:4])
    dense_tps = tokens_per_s(params, speed_tokens)
    rows = []
    for level in LEVELS:
        row = {"level": level}
        for name in runs:
            gates, rec = snapshot_at(runs[name], level)
            small = jp.compact(params, gates)
            row[name] = (jp.perplexity(small, ev, seqlen=512), rec["removed_fraction"], tokens_per_s(small, speed_tokens))
        if fc is not None:
            k = int(np.searchsorted(np.asarray(fc.params_removed), level * dense_n - 0.5) + 1)
            small = jp.compact(params, fc.gates_after(k))
            row["finercut"] = (jp.perplexity(small, ev, seqlen=512),
                               1 - structured.non_embedding_params(small) / dense_n, tokens_per_s(small, speed_tokens))
        rows.append(row)
        print(row, flush=True)

    bonsai_to_30 = (sum(r["seconds"] for r in runs["bonsai"] if r["removed_fraction"] < 0.3 - 0.005)
                    + snapshot_at(runs["bonsai"], 0.3)[1]["seconds"]) if "bonsai" in runs else float("nan")
    lines += ["", f"Dense: perplexity {dense_ppl:.2f}, {dense_n:,} non-embedding parameters, forward "
              f"{dense_tps:.0f} tokens/s (batch 4 x 512).", "",
              "| removed (target) | prior alone: ppl (removed) | Bonsai: ppl (removed) | FinerCut: ppl (removed) | "
              "tokens/s vs dense: prior / Bonsai / FinerCut |", "|---|---|---|---|---|"]
    for r in rows:
        cell = lambda n: f"{r[n][0]:.2f} ({r[n][1]:.1%})" if n in r else "-"
        speed = lambda n: f"{r[n][2] / dense_tps:.2f}x" if n in r else "-"
        lines.append(f"| {r['level']:.0%} | {cell('prior')} | {cell('bonsai')} | {cell('finercut')} | "
                     f"{speed('prior')} / {speed('bonsai')} / {speed('finercut')} |")
    t = lambda n: f"{seconds[n]:.0f} s" if n in seconds else "not run"
    lines += ["", f"Times to 50%: prior alone {t('prior')}; Bonsai ({args.samples} sub-models per round, rounds "
              f"of 5%) {t('bonsai')}, of which {bonsai_to_30:.0f} s to reach 30%; FinerCut (removal order "
              f"to 50%, on the first {args.finercut_calib} calibration windows) {t('finercut')}."]
    text = "\n".join(lines)
    print(text)
    write_section("Structured pruning on SmolLM2 (benchmarks/structured.py)", text)


if __name__ == "__main__":
    main()
