"""Compile time of deep models: layers under `jax.lax.scan` (stacked weights) vs the per-layer loop.

    python -m benchmarks.compile [--depths 8,16,32,80] [--loop-max 80] [--tokens 16] [--no-write]

The forward (`jaxprune.models.logits`) of a Llama-70B-shaped model (hidden 8192, 64 heads, 8 K/V
heads, FFN 28672, vocab 128256, bfloat16) at several depths, and of a SmolLM2-135M-shaped one at
its real size (30 layers, float32), is lowered and compiled from abstract weights
(`jax.ShapeDtypeStruct`: nothing is materialised) for one batch of `--tokens` tokens, once with
the layers stacked (`jaxprune.models.stack_layers`, one scanned layer body) and once as the
default list of layers (one copy of the layer per depth). Each figure is one lower + compile in a
fresh `jax.jit`; the table also gives the number of StableHLO operations in each program.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp

from jaxprune import models
from jaxprune.core.params import Params
from jaxprune.models.config import LlamaConfig


def llama70b_shaped(layers: int) -> LlamaConfig:
    """Llama-3-70B's shapes at any depth."""
    return LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers,
                       num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192)


def llama7b_shaped(layers: int, vocab: int = 32000) -> LlamaConfig:
    """Llama-2-7B's shapes at any depth."""
    return LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096)


def smollm2_shaped(layers: int = 30) -> LlamaConfig:
    """SmolLM2-135M's shapes (its real depth is 30)."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                       max_position_embeddings=8192, tie_word_embeddings=True)


def abstract_params(config, dtype) -> Params:
    """Params of `config` as `jax.ShapeDtypeStruct` leaves (no memory)."""
    leaf = lambda s: jax.ShapeDtypeStruct(s, dtype)
    return Params(config, jax.tree.map(leaf, models.shapes(config), is_leaf=models.is_shape))


def compile_seconds(params, tokens: int) -> tuple[float, int]:
    """(seconds to lower and compile the forward, StableHLO operations in the program)."""
    spec = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    t = time.perf_counter()
    lowered = jax.jit(models.logits).lower(params, spec)
    lowered.compile()
    seconds = time.perf_counter() - t
    return seconds, len(re.findall(r"\bstablehlo\.[a-z_]+", lowered.as_text()))


def measure(config, dtype, tokens: int, loop: bool) -> dict:
    params = abstract_params(config, dtype)
    row = {"layers": config.num_hidden_layers}
    row["scan_s"], row["scan_ops"] = compile_seconds(jax.eval_shape(models.stack_layers, params), tokens)
    if loop:
        row["loop_s"], row["loop_ops"] = compile_seconds(params, tokens)
    print(row, flush=True)
    return row


HEADER = ["| model | layers | scanned (s) | loop (s) | loop / scanned | program ops, scanned / loop |",
          "|---|---|---|---|---|---|"]


def table_rows(name: str, rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "loop_s" in r:
            loop, ratio, ops = f"{r['loop_s']:.2f}", f"{r['loop_s'] / r['scan_s']:.1f}x", f"{r['loop_ops']:,}"
        else:
            loop, ratio, ops = "not run", "-", "-"
        out.append(f"| {name} | {r['layers']} | {r['scan_s']:.2f} | {loop} | {ratio} | {r['scan_ops']:,} / {ops} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="8,16,32,80")
    ap.add_argument("--loop-max", type=int, default=80, help="deepest Llama-70B-shaped model compiled as a loop")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update benchmarks/RESULTS.md")
    args = ap.parse_args()
    from benchmarks.common import machine, write_section

    compile_seconds(jax.eval_shape(models.stack_layers, abstract_params(smollm2_shaped(1), jnp.float32)), 4)  # warm-up
    load_before = os.getloadavg()[0]
    depths = [int(d) for d in args.depths.split(",")]
    big = [measure(llama70b_shaped(L), jnp.bfloat16, args.tokens, L <= args.loop_max) for L in depths]
    small = [measure(smollm2_shaped(), jnp.float32, args.tokens, True)]
    load_after = os.getloadavg()[0]

    first, last = big[0], big[-1]
    lines = [f"Machine: {machine()}. Load average {load_before:.1f} before, {load_after:.1f} after "
             f"(the machine is shared: other jobs ran during the measurement).",
             f"Lower + compile of `jaxprune.models.logits` from abstract weights (`jax.ShapeDtypeStruct`), "
             f"one batch of 1 x {args.tokens} tokens, one fresh `jax.jit` per figure; scanned = "
             f"`jaxprune.models.stack_layers(params)` (one layer body under `jax.lax.scan`), loop = the default "
             f"list of layers.", "",
             *HEADER, *table_rows("Llama-70B-shaped, bf16", big), *table_rows("SmolLM2-135M-shaped, f32", small), ""]
    growth = f"Scanned: {last['layers']} layers compile in {last['scan_s'] / first['scan_s']:.2f}x the time of " \
             f"{first['layers']}"
    if "loop_s" in last:
        growth += f"; loop: {last['loop_s'] / first['loop_s']:.1f}x."
    else:
        growth += f"; the loop was compiled only up to {args.loop_max} layers."
    lines.append(growth)
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("Compile time of deep models (benchmarks/compile.py)", text)


if __name__ == "__main__":
    main()
