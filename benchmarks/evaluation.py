"""Standard-style evaluation of SmolLM2-135M: dense vs Wanda 50% vs magnitude 50%.

    python -m benchmarks.evaluation                      # 100 + 100 task examples, 16 generations
    python -m benchmarks.evaluation --quick              # 20 + 20 examples, 4 generations (smoke run)

About 15 minutes on a 2-core CPU (5 with --quick): greedy decoding has no KV
cache, so each of the 32 steps re-runs the whole 16 x 128-token buffer, and
generation takes half of the time.

Offline proxy tasks from the evaluation novel (prideprejudice, never used for
calibration; see jaxprune/tasks.py for their construction):

- last word (LAMBADA-like): accuracy = the target is the greedy continuation
  (lm-eval's lambada acc); "target ppl" = exp(-mean target loglikelihood), as
  lm-eval's lambada perplexity.
- next sentence (HellaSwag-like, 4 choices): acc (raw loglikelihood) and
  acc_norm (per character, the headline number).
- generation: greedy 32-token continuations of 16 passages (48+ words)
  against the true next 24 words: ROUGE-1/2/L F and embedding cosine. The embedding is the
  *dense* model's mean-pooled final hidden state for every row, so all rows
  share one embedding space.

Wanda: 32 x 512-token calibration windows from emma (seed 0), unstructured
50% per output row; magnitude: 50% per layer. "non-zero" counts every entry
of the params (embeddings and norms included). Generation time is decoding
only (compilation excluded), without a KV cache. Size on disk: the safetensors of
`jp.save` (dense) or `jp.save_compressed` (pruned: kept values + bit-packed masks).
"""

from __future__ import annotations

import argparse
import math
import time

GEN_CONTEXT_WORDS = 48     # decoding re-runs the whole buffer each step: short prompts keep it affordable


def size_on_disk(params, masks) -> int:
    """Bytes of the model's safetensors: `jp.save` when dense, `jp.save_compressed` when pruned."""
    import os
    import tempfile

    import jaxprune as jp
    with tempfile.TemporaryDirectory() as d:
        if masks is None:
            out = jp.save(params, os.path.join(d, "m"))
            return sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
        return int(jp.save_compressed(params, os.path.join(d, "m"), masks=masks)["bytes_on_disk"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small smoke run; RESULTS.md is not written")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    n_lw, n_ct, n_gen = (20, 20, 4) if args.quick else (100, 100, 16)

    import jax
    import numpy as np

    import jaxprune as jp
    from benchmarks.common import machine, write_section
    from jaxprune.evaluation import generation_metrics as gm
    from jaxprune.evaluation import tasks

    t0 = time.perf_counter()
    dense = jp.load("smollm2-135m")
    tok = jp.tokenizer("smollm2-135m")
    calib = jp.calibration_windows(tok, [jp.bundled_text("emma")], n=32, seqlen=512, seed=0)
    models, masks = {"dense": dense}, {"dense": None}
    t = time.perf_counter()
    masks["wanda 50%"] = jp.wanda(dense, calib, 0.5)
    models["wanda 50%"] = jax.block_until_ready(jp.apply_masks(dense, masks["wanda 50%"]))
    prune_s = {"dense": 0.0, "wanda 50%": time.perf_counter() - t}
    t = time.perf_counter()
    masks["magnitude 50%"] = jp.magnitude(dense, 0.5)
    models["magnitude 50%"] = jax.block_until_ready(jp.apply_masks(dense, masks["magnitude 50%"]))
    prune_s["magnitude 50%"] = time.perf_counter() - t
    load_s = time.perf_counter() - t0
    print(f"loaded and pruned in {load_s:.0f} s", flush=True)

    lw = tasks.last_word_task(n=n_lw, seed=0)
    ct = tasks.continuation_task(n=n_ct, n_choices=4, seed=0)
    gen = tasks.generation_task(n=n_gen, context_words=GEN_CONTEXT_WORDS, reference_words=24, seed=0)
    embed = gm.hidden_state_embedder(dense, tok)

    rows = []
    for name, params in models.items():
        t = time.perf_counter()
        lp, greedy = tasks.last_word_scores(params, tok, lw, batch_size=args.batch_size)
        s = tasks.choice_scores(params, tok, ct, batch_size=args.batch_size)
        labels = np.array([e.label for e in ct])
        g = gm.evaluate_generation(params, tok, [e.prompt for e in gen], [e.reference for e in gen],
                                  max_new_tokens=32, embed_fn=embed, batch_size=16)
        r = {"model": name, "nonzero": g["nonzero_params"], "total": g["total_params"],
             "disk": size_on_disk(params, masks[name]),
             "lw_acc": float(greedy.mean()), "lw_ppl": math.exp(-float(lp.mean())),
             "ct_acc": float((s["logprob"].argmax(1) == labels).mean()),
             "ct_acc_norm": float(((s["logprob"] / s["chars"]).argmax(1) == labels).mean()),
             **{k: g[k] for k in ("rouge1", "rouge2", "rougeL", "embedding_similarity", "generation_seconds",
                                  "tokens_per_second")},
             "eval_s": time.perf_counter() - t, "prune_s": prune_s[name], "sample": g["generations"][0]}
        rows.append(r)
        print({k: v for k, v in r.items() if k != "sample"}, flush=True)

    lines = [f"Machine: {machine()}.",
             f"SmolLM2-135M-Instruct (GGUF, float32). Offline proxy tasks from prideprejudice (`jaxprune.evaluation.tasks`, "
             f"seed 0): {n_lw} last-word examples (50+ word passages), {n_ct} next-sentence examples (3 context "
             f"sentences, 4 choices), {n_gen} greedy generations of 32 tokens from {GEN_CONTEXT_WORDS}+ word passages "
             "scored against the next 24 words (ROUGE F, stemmed; cosine of the dense model's mean-pooled final hidden "
             "states). Wanda: 32 x 512 calibration tokens from emma; both pruners 50% unstructured. "
             "Generation: decoding only, no KV cache, batch 16. Size on disk: jp.save (dense) or "
             "jp.save_compressed (pruned) safetensors bytes.",
             "",
             "| model | non-zero params | size on disk (MB) | last-word acc | target ppl | next-sentence acc | acc_norm | ROUGE-1 | "
             "ROUGE-2 | ROUGE-L | emb. cosine | gen. time (s) | tokens/s | eval time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['nonzero'] / 1e6:.1f}M / {r['total'] / 1e6:.1f}M | {r['disk'] / 1e6:.1f} | "
                     f"{r['lw_acc']:.2f} | "
                     f"{r['lw_ppl']:.1f} | {r['ct_acc']:.2f} | {r['ct_acc_norm']:.2f} | {r['rouge1']:.3f} | "
                     f"{r['rouge2']:.3f} | {r['rougeL']:.3f} | {r['embedding_similarity']:.3f} | "
                     f"{r['generation_seconds']:.1f} | {r['tokens_per_second']:.1f} | {r['eval_s']:.0f} |")
    lines += ["", f"Whole run: {time.perf_counter() - t0:.0f} s (loading and pruning {load_s:.0f} s).",
              "", f"Standard error of an accuracy over {n_lw} examples is up to "
              f"{0.5 / math.sqrt(n_lw):.2f}: differences below about twice that are noise.",
              "", "First generation of each model (prompt: " + repr(gen[0].prompt[-120:]) + "; reference: "
              + repr(gen[0].reference) + "):", ""]
    lines += [f"- {r['model']}: {r['sample']!r}" for r in rows]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_section("Standard evaluation on SmolLM2 (benchmarks/evaluation.py)", text)


if __name__ == "__main__":
    main()
