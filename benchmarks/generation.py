"""Prefill and decode tokens/s of jaxprune's KV-cached engine vs `transformers` `generate`.

    python -m benchmarks.generation [--prompt 128] [--new 128] [--batches 1,16] [--repeats 2]

Same SmolLM2 weights, float32 both, greedy, prompts of real text; dense and a uniformly
compacted SmolLM2 (one query head of each K/V group and 40% of FFN channels removed, about
30% of non-embedding parameters). Prefill time is a 1-token generation; decode tokens/s is
(N - 1) tokens per row over the extra time of an N-token generation. Compilation is excluded
(each shape runs once first). Ratios are ours / transformers, measured in this run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from benchmarks.common import best_of, machine, write_section
from benchmarks.forward import torch_model
from jaxprune.generation import cache_bytes, decode
from jaxprune.structured import non_embedding_params as non_embedding_size


def compacted(params):
    cfg = params.config
    L, H, F = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    G = H // cfg.num_key_value_heads
    heads = np.ones((L, H), np.float32)
    heads[:, G - 1::G] = 0.0                                 # the last head of every group
    ffn = np.ones((L, F), np.float32)
    ffn[:, : int(0.4 * F)] = 0.0
    return jp.compact(params, {"heads": jnp.asarray(heads), "ffn": jnp.asarray(ffn)})


def time_ours(params, prompts, n, repeats):
    decode(params, prompts, n)                               # compile
    return best_of(lambda: decode(params, prompts, n), repeats)


def time_torch(model, prompts, n, repeats):
    import torch
    x = torch.tensor(np.asarray(prompts, np.int64))
    run = lambda: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        run()
        return best_of(run, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    dense = jp.load("smollm2-135m")
    tok = jp.tokenizer("smollm2-135m")
    batches = [int(b) for b in args.batches.split(",")]
    windows = jp.eval_windows(tok, jp.bundled_text("prideprejudice"), args.prompt, max_windows=max(batches))
    rows = [
        "| model | batch | prefill tok/s ours | prefill tok/s transformers | ratio | decode tok/s ours "
        "| decode tok/s transformers | ratio | KV cache |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    small = compacted(dense)
    removed = 1 - non_embedding_size(small) / non_embedding_size(dense)
    for name, params in (("dense", dense), (f"compacted ({removed:.0%} removed)", small)):
        model = torch_model(params)
        for B in batches:
            prompts = [list(map(int, w)) for w in windows[:B]]
            t1, tn = time_ours(params, prompts, 1, args.repeats), time_ours(params, prompts, args.new, args.repeats)
            r1, rn = time_torch(model, prompts, 1, args.repeats), time_torch(model, prompts, args.new, args.repeats)
            pre_o, pre_t = B * args.prompt / t1, B * args.prompt / r1
            dec_o, dec_t = B * (args.new - 1) / (tn - t1), B * (args.new - 1) / (rn - r1)
            mib = cache_bytes(params, B, args.prompt + args.new) / 2**20
            rows.append(f"| {name} | {B} | {pre_o:,.0f} | {pre_t:,.0f} | {pre_o / pre_t:.2f}x | {dec_o:,.1f} "
                        f"| {dec_t:,.1f} | **{dec_o / dec_t:.2f}x** | {mib:.1f} MiB |")
            print(rows[-1], flush=True)
    lines = [
        f"Machine: {machine()}; torch {torch.__version__} with {torch.get_num_threads()} threads.",
        f"SmolLM2-135M float32, greedy, {args.prompt}-token prompts of prideprejudice, {args.new} new tokens, "
        f"best of {args.repeats}; transformers `generate` with its KV cache.",
        "",
        *rows,
        "",
        "KV cache: jaxprune's fixed-size cache (prompt + new tokens, every layer) for that batch.",
    ]
    print("\n".join(lines))
    write_section("Generation (benchmarks/generation.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
