"""Tokens/s of jaxprune's jitted forward vs `transformers` (PyTorch) on the same SmolLM2 weights.

    python -m benchmarks.forward [--batch 4] [--seqlen 512] [--repeats 3]

Both run float32 on the same batch of real text; logits are compared too. The
ratio (ours / transformers) is printed and written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune.io.names import flatten_tree
from benchmarks.common import best_of, machine, write_section


def torch_model(params):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**{k: v for k, v in params.config.to_hf().items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = {name: torch.from_numpy(np.array(leaf.T if path[-1] == "kernel" else leaf))
             for name, (path, leaf) in flatten_tree(params.tree, params.config.arch).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    params = jp.load("smollm2-135m")
    tok = jp.tokenizer("smollm2-135m")
    tokens = jp.eval_windows(tok, jp.bundled_text("prideprejudice"), args.seqlen, max_windows=args.batch)
    n_tok = tokens.size

    x = jnp.asarray(tokens)
    ours = jp.forward(params, x).block_until_ready()  # compile
    t_ours = best_of(lambda: jp.forward(params, x).block_until_ready(), args.repeats)

    model = torch_model(params)
    tt = torch.from_numpy(tokens.astype(np.int64))
    with torch.inference_mode():
        ref = model(tt).logits.numpy()
        t_ref = best_of(lambda: model(tt), args.repeats)
    diff = float(np.abs(np.asarray(ours) - ref).max())

    ratio = t_ref / t_ours
    lines = [
        f"Machine: {machine()}; torch {torch.__version__} with {torch.get_num_threads()} threads.",
        f"SmolLM2-135M (from GGUF, float32), batch {args.batch} x {args.seqlen} tokens of prideprejudice, best of {args.repeats}.",
        "",
        "| forward | time (s) | tokens/s |",
        "|---|---|---|",
        f"| jaxprune (jit) | {t_ours:.3f} | {n_tok / t_ours:,.0f} |",
        f"| transformers (PyTorch eager) | {t_ref:.3f} | {n_tok / t_ref:,.0f} |",
        "",
        f"Ratio jaxprune / transformers: **{ratio:.2f}x**; max |logit diff| {diff:.2e}.",
    ]
    print("\n".join(lines))
    write_section("Forward throughput (benchmarks/forward.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
