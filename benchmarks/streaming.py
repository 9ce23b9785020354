"""Layer streaming on Llama-7B-shaped bf16 checkpoints: time and peak memory.

    python -m benchmarks.streaming [--layers 32] [--vocab 32000] [--windows 8] [--seqlen 128]
                                   [--work DIR] [--skip-full] [--keep]

Random weights with the shapes of Llama-7B (hidden 4096, FFN 11008, 32 heads) in bfloat16:
1. a 2-layer checkpoint pruned by Wanda and SparseGPT, streamed and, as the peer in the same
   run, in memory (`jaxprune.load` keeping bf16, then `jaxprune.wanda`/`sparsegpt`): seconds per
   layer and peak resident memory of each;
2. the full 32-layer checkpoint (~13 GB) streamed end to end with Wanda: time and peak memory.
Each run is its own process; its peak is Linux VmHWM, reset after start-up, above the resident
size of the bare runtime. Calibration: `--windows` random token windows of `--seqlen`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

GiB, MiB = 2**30, 2**20


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def child(args):
    """One measured run in this process: prints {"seconds", "baseline", "peak"}."""
    import gc
    import jax
    import jax.numpy as jnp
    import numpy as np
    import jaxprune as jp
    from jaxprune.oneshot import streaming
    from jaxprune.io.hf import read_config

    jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
    gc.collect()
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    cfg = read_config(args.src)
    calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.windows, args.seqlen))
    t = time.perf_counter()
    if args.child == "stream":
        streaming.return_freed_memory()
        streaming.prune_streaming(args.src, args.out, calib, args.method, 0.5, batch_size=args.windows,
                                  show_progress=False)
    else:
        params = jp.load(args.src, dtype=None)
        if args.method == "wanda":
            out = jp.wanda(params, calib, 0.5, batch_size=args.windows, show_progress=False)
        else:
            out = jp.sparsegpt(params, calib, 0.5, batch_size=args.windows, show_progress=False)
        jax.block_until_ready(out)
    seconds = time.perf_counter() - t
    peak = _status("VmHWM")
    kept = None
    if args.child == "stream":   # check the output really is pruned: kept fraction of the first and last layer
        from jaxprune.io.safetensors import open_safetensors
        files = sorted(f for f in os.listdir(args.out) if f.startswith("masks-"))
        kept = [float(np.mean([np.asarray(a).mean() for a in open_safetensors(os.path.join(args.out, f)).values()]))
                for f in (files[0], files[-1])]
    print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": peak, "kept": kept}), flush=True)


def run_child(mode, method, src, out, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.streaming", "--child", mode, "--method", method, "--src", src,
           "--out", out, "--windows", str(args.windows), "--seqlen", str(args.seqlen)]
    env = dict(os.environ, JAXPRUNE_PROGRESS="0")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{mode} {method} failed:\n{r.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--work", default="/tmp/jaxprune-bench-7b")
    ap.add_argument("--skip-full", action="store_true", help="only the 2-layer comparison")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--child", choices=["stream", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--method", default="wanda", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import ml_dtypes
    import jaxprune as jp
    from jaxprune.oneshot import streaming
    from benchmarks.common import machine, write_section

    def config(layers):
        return jp.LlamaConfig(vocab_size=args.vocab, hidden_size=4096, intermediate_size=11008,
                              num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                              max_position_embeddings=4096)

    os.makedirs(args.work, exist_ok=True)
    layer = streaming.layer_bytes(config(1), ml_dtypes.bfloat16)
    acts = args.windows * args.seqlen * 4096 * 4
    rows = []
    small = os.path.join(args.work, "llama7b-shaped-2layers")
    if not os.path.exists(small):
        streaming.write_random_checkpoint(small, config(2), ml_dtypes.bfloat16)
    for method in ("wanda", "sparsegpt"):
        for mode in ("stream", "memory"):
            m = run_child(mode, method, small, os.path.join(args.work, "out"), args)
            m.update(method=method, mode=mode)
            rows.append(m)
            print(f"2 layers, {method}, {mode}: {m['seconds']:.1f} s, peak +{(m['peak'] - m['baseline']) / MiB:.0f} MiB"
                  f", kept {m['kept']}", flush=True)

    full = None
    if not args.skip_full:
        big = os.path.join(args.work, f"llama7b-shaped-{args.layers}layers")
        if not os.path.exists(big):
            t = time.perf_counter()
            streaming.write_random_checkpoint(big, config(args.layers), ml_dtypes.bfloat16)
            print(f"wrote {big} in {time.perf_counter() - t:.0f} s", flush=True)
        size = sum(os.path.getsize(os.path.join(big, f)) for f in os.listdir(big))
        full = run_child("stream", "wanda", big, os.path.join(args.work, "out"), args)
        full["size"] = size
        print(f"{args.layers} layers ({size / GiB:.1f} GiB), wanda streamed: {full['seconds']:.0f} s, "
              f"peak +{(full['peak'] - full['baseline']) / MiB:.0f} MiB, kept {full['kept']}", flush=True)
        if not args.keep:
            shutil.rmtree(big, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(small, ignore_errors=True)

    by = {(r["method"], r["mode"]): r for r in rows}
    lines = [f"Machine: {machine()}. Random weights shaped like Llama-7B (hidden 4096, FFN 11008, 32 heads, "
             f"vocab {args.vocab}), bfloat16; one layer = {layer / MiB:.0f} MiB. Calibration: {args.windows} x "
             f"{args.seqlen} tokens (activations {acts / MiB:.0f} MiB in float32). Peak = Linux VmHWM of the run's "
             f"own process, reset after start-up, minus the bare runtime's resident size.", "",
             "Two layers, streamed vs in memory (peer: `jaxprune.load(dtype=None)` then the same method):", "",
             "| method | mode | time | s / layer | peak above runtime | vs 2 x layer + activations |",
             "|---|---|---|---|---|---|"]
    budget = 2 * layer + acts
    for (method, mode), r in by.items():
        used = r["peak"] - r["baseline"]
        lines.append(f"| {method} | {'streamed' if mode == 'stream' else 'in memory'} | {r['seconds']:.1f} s | "
                     f"{r['seconds'] / 2:.1f} | {used / MiB:.0f} MiB | {used / budget:.2f} |")
    for method in ("wanda", "sparsegpt"):
        s, m = by[(method, "stream")], by[(method, "memory")]
        lines.append("")
        lines.append(f"{method}: streamed / in memory: time {s['seconds'] / m['seconds']:.2f}x, peak memory "
                     f"{(s['peak'] - s['baseline']) / (m['peak'] - m['baseline']):.2f}x.")
    if full is not None:
        used = full["peak"] - full["baseline"]
        lines += ["", f"Full model: {args.layers} layers, {full['size'] / GiB:.1f} GiB on disk, Wanda streamed end to end "
                  f"in {full['seconds']:.0f} s ({full['seconds'] / args.layers:.1f} s per layer, including reading and "
                  f"writing), peak {used / MiB:.0f} MiB above the runtime ({used / full['size'] * 100:.1f}% of the "
                  f"checkpoint; {used / budget:.2f} x the 2-layers-plus-activations budget); the bare runtime held "
                  f"{full['baseline'] / MiB:.0f} MiB. Kept fraction of the first and last layer's weights: "
                  f"{full['kept'][0]:.3f}, {full['kept'][1]:.3f}."]
    write_section("Layer streaming on a 7B-shaped bf16 checkpoint (benchmarks/streaming.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
