"""One timed run on whatever device JAX sees (a GPU, or the CPU), each figure against that device's floor.

    python -m benchmarks.gpu [--tiny] [--out PATH] [--budget 420] [--row-timeout 180] [--only ROWS] [--write]
    benchmarks/gpu.sh [--tiny] [--out PATH]       # the same under a hard `timeout`

Rows (stdout: a markdown table; `--out`: JSON with one dict per row):

- ``peak probe``: one large matmul in the model dtype;
- ``forward smollm2``: tokens/s of SmolLM2-135M (its real weights from `jp.load("smollm2-135m")`
  when the weights package is installed, else random weights of its shapes; the row says which);
- ``forward 7b-stack``: tokens/s of 4 Llama-7B-shaped layers (+ embeddings and LM head, vocab 32000);
- ``wanda 7b-layer``, ``sparsegpt 7b-layer``: one Llama-7B-shaped layer pruned to 50% (sequential
  mode) on 128 x 2048 calibration tokens;
- ``bonsai vmap``, ``bonsai loop``: seconds per sub-model for 16 random SmolLM2 sub-models scored by
  the perplexity utility, vmapped (`jaxprune.structured.utility.evaluate`) vs a Python loop over one
  jitted sub-model;
- ``decode ... b1`` / ``b16``: `jp.generate` tokens/s (greedy, 64 new tokens after 16-token prompts)
  of SmolLM2 and of the 7B stack.

Every row reports the steady time (best of the timed calls after one warm-up call; the warm-up's extra
time is the compile time, reported apart), the floor (the larger of FLOPs / peak FLOP/s and bytes /
peak memory bandwidth, which one is named) and measured / floor. Models run in bfloat16 on an
accelerator, float32 on CPU. Peaks of H100 / H200 / A100 come from their spec sheets (`PEAKS`, by
`device_kind`; float32 matmuls at the TF32 rate, XLA's default precision there); on a CPU or an
unknown device they are estimated from a measured float32 matmul and the sum of a large array.

`--tiny` makes every shape tiny (the CPU test, well under a minute). A row that starts after `--budget`
seconds or runs longer than `--row-timeout` is recorded as skipped; the JSON is rewritten after every
row, so a killed run keeps what it measured. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # never reach for a network
os.environ.setdefault("JAXPRUNE_PROGRESS", "0")

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from jaxprune import models
from jaxprune.core.params import Params
from jaxprune.models.layout import layout_of
from benchmarks.compile import llama7b_shaped, smollm2_shaped

# device_kind substring -> dense peaks: bf16 FLOP/s, float32 matmul FLOP/s (TF32), memory bytes/s.
PEAKS = (("H200", {"bf16": 989e12, "fp32": 494e12, "hbm": 4.8e12}),
         ("H100 PCIe", {"bf16": 756e12, "fp32": 378e12, "hbm": 2.0e12}),
         ("H100", {"bf16": 989e12, "fp32": 494e12, "hbm": 3.35e12}),
         ("A100-SXM4-40GB", {"bf16": 312e12, "fp32": 156e12, "hbm": 1.555e12}),
         ("A100", {"bf16": 312e12, "fp32": 156e12, "hbm": 2.039e12}))


@dataclasses.dataclass(frozen=True)
class Sizes:
    forward: tuple = (8, 2048)        # SmolLM2 forward batch x seqlen
    stack_forward: tuple = (4, 2048)  # 7B stack forward
    calib: tuple = (128, 2048)        # pruning calibration windows x seqlen
    calib_batch: int = 16
    bonsai: tuple = (16, 8, 512)      # sub-models, windows, seqlen
    prompt: int = 16
    new_tokens: int = 64
    probe: int = 8192                 # matmul side
    stream: int = 1 << 28             # bytes of the bandwidth probe (CPU)
    stack_layers: int = 4


FULL = Sizes()
TINY = Sizes(forward=(2, 64), stack_forward=(2, 64), calib=(8, 64), calib_batch=4, bonsai=(16, 2, 32),
             prompt=16, new_tokens=8, probe=512, stream=1 << 26, stack_layers=2)


def tiny_llama(layers: int = 2):
    """The one tiny config that stands in for SmolLM2 and the 7B stack with --tiny (shared programs
    keep the CPU test short)."""
    return jp.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2)


# ---- timing ----------------------------------------------------------------------------------

def timed(fn, repeats: int) -> tuple[float, float]:
    """(best steady seconds, compile seconds = first call minus best); `fn` must block."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    best = min(times)
    return best, max(first - best, 0.0)


def block(x):
    return jax.block_until_ready(x)


# ---- the device and its floor ----------------------------------------------------------------

def device_peaks(sizes: Sizes) -> dict:
    """Peak FLOP/s per dtype and memory bandwidth of device 0, with where they come from."""
    dev = jax.devices()[0]
    for name, peaks in PEAKS:
        if dev.platform == "gpu" and name.lower() in dev.device_kind.lower():
            return {**peaks, "source": f"spec sheet ({name}, dense)"}
    n = sizes.probe // 2 if sizes is FULL else sizes.probe
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    t_mm, _ = timed(lambda: block(mm(a)), 3)
    x = jnp.ones((sizes.stream // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    t_bw, _ = timed(lambda: block(total(x)), 5)
    flops = 2 * n ** 3 / t_mm
    return {"bf16": flops, "fp32": flops, "hbm": sizes.stream / t_bw,
            "source": f"estimated on this {dev.platform} device from a float32 {n}x{n} matmul and the sum "
                      f"of a {sizes.stream >> 20} MiB array"}


def floor(flops: float, nbytes: float, peaks: dict, dtype, fp32_flops: float = 0.0) -> dict:
    """Floor seconds: the larger of compute (flops at the dtype's peak, `fp32_flops` at the float32
    peak) and memory traffic (nbytes at the peak bandwidth)."""
    key = "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "fp32"
    compute = flops / peaks[key] + fp32_flops / peaks["fp32"]
    memory = nbytes / peaks["hbm"]
    return {"floor_s": max(compute, memory), "bound": "FLOP" if compute >= memory else "memory"}


def layer_linear_params(cfg) -> int:
    D, H, KV, Dh, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                       cfg.intermediate_size)
    return D * H * Dh + 2 * D * KV * Dh + H * Dh * D + 3 * D * F


def attention_flops(cfg, batch: int, seq: int) -> float:
    """Causal QK^T and PV of one layer: 4 * heads * head_dim per visible (query, key) pair."""
    return 4.0 * cfg.num_attention_heads * cfg.head_dim * batch * seq * (seq + 1) / 2


def forward_flops(cfg, batch: int, seq: int) -> float:
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    return L * (2.0 * layer_linear_params(cfg) * batch * seq + attention_flops(cfg, batch, seq)) + 2.0 * D * V * batch * seq


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ---- models ----------------------------------------------------------------------------------

def random_params(cfg, dtype, seed: int = 0) -> Params:
    """`models.init`'s distribution drawn with numpy, one leaf at a time (no compile per shape)."""
    rng, offset = np.random.default_rng(seed), layout_of(cfg).norm_offset

    def leaf(path, shape):
        v = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if path[-1].key == "scale":
            v += np.float32(1.0 - offset)
        return jnp.asarray(v, dtype)

    return Params(cfg, jax.tree_util.tree_map_with_path(leaf, models.shapes(cfg), is_leaf=models.is_shape))


def load_smollm2(tiny: bool, dtype) -> tuple[Params, str]:
    if tiny:
        return random_params(tiny_llama(), dtype), "tiny random"
    try:
        return jp.load("smollm2-135m", dtype=dtype), "SmolLM2-135M (real weights)"
    except jp.CheckpointError:
        return random_params(smollm2_shaped(), dtype), "SmolLM2-135M-shaped, random (weights package not installed)"


def tokens(cfg, batch: int, seq: int, seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)


# ---- the rows --------------------------------------------------------------------------------

def row_probe(ctx):
    n = ctx["sizes"].probe
    a = jnp.ones((n, n), ctx["dtype"])
    mm = jax.jit(lambda x: x @ x)
    s, c = timed(lambda: block(mm(a)), 3)
    return {"model": f"{n}x{n} matmul", "value": 2 * n ** 3 / s / 1e12, "unit": "TFLOP/s", "seconds": s,
            "compile_s": c, **floor(2.0 * n ** 3, 3 * n * n * a.dtype.itemsize, ctx["peaks"], ctx["dtype"])}


def row_forward(ctx, params, label, shape):
    B, T = shape
    x = tokens(params.config, B, T)
    s, c = timed(lambda: block(jp.forward(params, x)), 3)
    fl = floor(forward_flops(params.config, B, T), nbytes(params), ctx["peaks"], ctx["dtype"])
    return {"model": f"{label}, batch {B} x {T}", "value": B * T / s, "unit": "tokens/s", "seconds": s,
            "compile_s": c, **fl}


def prune_floor(cfg, n: int, T: int, peaks, dtype, hessians: bool) -> dict:
    """One pass of the layer over the calibration tokens; SparseGPT adds the float32 Hessians of each
    distinct linear input and the OBS solve of each kernel (d_out * d_in^2 + d_in^3)."""
    N = n * T
    flops = 2.0 * layer_linear_params(cfg) * N + attention_flops(cfg, n, T)
    fp32 = 0.0
    if hessians:
        D, HD, F = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size
        KVD = cfg.num_key_value_heads * cfg.head_dim
        fp32 = 2.0 * N * (2 * D * D + HD * HD + F * F)
        kernels = [(D, HD), (D, KVD), (D, KVD), (HD, D), (D, F), (D, F), (F, D)]
        fp32 += sum(o * i * i + i ** 3 for i, o in kernels)
    return floor(flops, layer_linear_params(cfg) * jnp.dtype(dtype).itemsize, peaks, dtype, fp32)


def row_prune(ctx, method):
    layer = ctx["layer"]
    n, T = ctx["sizes"].calib
    calib = np.asarray(tokens(layer.config, n, T, seed=1))
    bs = ctx["sizes"].calib_batch
    if method == "wanda":
        run = lambda: block(jp.wanda(layer, calib, 0.5, batch_size=bs, show_progress=False))
    else:
        run = lambda: block(jp.sparsegpt(layer, calib, 0.5, batch_size=bs, show_progress=False))
    s, c = timed(run, 1)
    fl = prune_floor(layer.config, n, T, ctx["peaks"], ctx["dtype"], hessians=method == "sparsegpt")
    return {"model": f"{ctx['stack_label']} layer, 50%, {n} x {T} calibration tokens", "value": s, "unit": "s",
            "seconds": s, "compile_s": c, **fl}


def rows_bonsai(ctx):
    from jaxprune.structured.utility import evaluate, perplexity_utility
    params = ctx["smollm2"]
    cfg = params.config
    S, n, T = ctx["sizes"].bonsai
    u = perplexity_utility(tokens(cfg, n, T, seed=2))
    rng = np.random.default_rng(0)
    g = {"heads": jnp.asarray(rng.random((S, cfg.num_hidden_layers, cfg.num_attention_heads)) < 0.9, jnp.float32),
         "ffn": jnp.asarray(rng.random((S, cfg.num_hidden_layers, cfg.intermediate_size)) < 0.9, jnp.float32)}
    s_vmap, c_vmap = timed(lambda: evaluate(u, params, g, batch_size=8), 2)
    single = jax.jit(u)
    one = [jax.tree.map(lambda x: x[i], g) for i in range(S)]
    s_loop, c_loop = timed(lambda: [block(single(params, gi)) for gi in one], 2)
    fl = floor(forward_flops(cfg, n, T), nbytes(params), ctx["peaks"], ctx["dtype"])
    what = f"{ctx['smollm2_label']}, {S} sub-models x {n} x {T} tokens"
    out = []
    for name, s, c in (("bonsai vmap", s_vmap, c_vmap), ("bonsai loop", s_loop, c_loop)):
        out.append((name, {"model": what, "value": s / S, "unit": "s/sub-model", "seconds": s / S, "compile_s": c,
                           **fl, "note": f"loop / vmap {s_loop / s_vmap:.2f}x"}))
    return out


def row_decode(ctx, params, label, batch):
    cfg = params.config
    P, new = ctx["sizes"].prompt, ctx["sizes"].new_tokens
    prompts = np.asarray(tokens(cfg, batch, P, seed=3)).tolist()
    s, c = timed(lambda: jp.generate(params, prompts, max_new_tokens=new, stop_token_ids=()), 2)
    L, KVD = cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim
    item = jnp.dtype(ctx["dtype"]).itemsize
    pos = P + new / 2                                            # mean cache length read per step
    weights = L * layer_linear_params(cfg) + cfg.hidden_size * cfg.vocab_size
    step_flops = 2.0 * weights * batch + L * 4.0 * cfg.num_attention_heads * cfg.head_dim * pos * batch
    step_bytes = weights * item + 2 * L * KVD * pos * batch * item
    step = floor(step_flops, step_bytes, ctx["peaks"], ctx["dtype"])
    prefill = floor(forward_flops(cfg, batch, P), nbytes(params), ctx["peaks"], ctx["dtype"])
    return {"model": f"{label}, batch {batch}, {P} + {new} tokens", "value": batch * new / s, "unit": "tokens/s",
            "seconds": s, "compile_s": c, "floor_s": new * step["floor_s"] + prefill["floor_s"],
            "bound": step["bound"], "note": "time and floor include the prefill"}


# ---- the run ---------------------------------------------------------------------------------

class Run:
    """Rows in order, a global budget, a per-row alarm, and the JSON rewritten after every row."""

    def __init__(self, out: str | None, budget: float, row_timeout: int, meta: dict, only=None):
        self.out, self.budget, self.row_timeout, self.meta, self.only = out, budget, row_timeout, meta, only
        self.rows, self.t0 = [], time.perf_counter()

    def add(self, name: str, fn):
        """Run fn() -> row dict (or a list of (name, row)); record skips and errors as rows."""
        if self.only and not any(name.startswith(o) for o in self.only):
            return
        if time.perf_counter() - self.t0 > self.budget:
            self._record(name, {"skipped": f"over the {self.budget:.0f} s budget"})
            return

        def alarm(*_):
            raise TimeoutError(f"row ran past {self.row_timeout} s")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(self.row_timeout)
        try:
            result = fn()
        except TimeoutError as e:
            result = {"skipped": str(e)}
        except Exception as e:  # noqa: BLE001 (one failed row must not lose the others)
            result = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        for n, r in (result if isinstance(result, list) else [(name, result)]):
            if "floor_s" in r:
                r["vs_floor"] = r["seconds"] / r["floor_s"]
            self._record(n, r)

    def _record(self, name, row):
        self.rows.append({"name": name, **row})
        print(f"{name}: {json.dumps(row)}", flush=True)
        self.write()

    def write(self):
        if self.out:
            with open(self.out, "w") as f:
                json.dump({**self.meta, "total_s": time.perf_counter() - self.t0, "rows": self.rows}, f, indent=1)

    def markdown(self) -> str:
        lines = ["| row | what | value | compile (s) | floor (s) | bound | measured / floor | note |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            if "value" not in r:
                lines.append(f"| {r['name']} | {r.get('skipped') or r.get('error')} | | | | | | |")
                continue
            lines.append(f"| {r['name']} | {r['model']} | {r['value']:,.4g} {r['unit']} | {r['compile_s']:.2f} | "
                         f"{r['floor_s']:.3g} | {r['bound']} | {r['vs_floor']:.1f}x | {r.get('note', '')} |")
        return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU test)")
    ap.add_argument("--out", help="JSON file to write")
    ap.add_argument("--budget", type=float, default=420.0, help="start no row after this many seconds")
    ap.add_argument("--row-timeout", type=int, default=180, help="seconds one row may run")
    ap.add_argument("--only", help="comma-separated row names (prefixes) to run, e.g. 'forward,decode'")
    ap.add_argument("--write", action="store_true", help="also record the table in benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    from benchmarks.common import machine, write_section

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    sizes = TINY if args.tiny else FULL
    dtype = jnp.float32 if dev.platform == "cpu" else jnp.bfloat16
    peaks = device_peaks(sizes)
    meta = {"platform": dev.platform, "device_kind": dev.device_kind, "machine": machine(), "tiny": args.tiny,
            "dtype": jnp.dtype(dtype).name, "jax": jax.__version__, "peaks": peaks}
    run = Run(args.out, args.budget, args.row_timeout, meta, args.only.split(",") if args.only else None)
    print(f"{meta['machine']}; {meta['dtype']}; peaks {json.dumps(peaks)}", flush=True)

    smollm2, smollm2_label = load_smollm2(args.tiny, dtype)
    stack_cfg = tiny_llama(sizes.stack_layers) if args.tiny else llama7b_shaped(sizes.stack_layers)
    stack = random_params(stack_cfg, dtype, seed=1)
    stack_label = ("tiny" if args.tiny else "Llama-7B-shaped") + f" {sizes.stack_layers}-layer stack"
    one_layer = Params(dataclasses.replace(stack_cfg, num_hidden_layers=1), {**stack.tree, "layers": stack.tree["layers"][:1]})
    ctx = {"sizes": sizes, "dtype": dtype, "peaks": peaks, "smollm2": smollm2, "smollm2_label": smollm2_label,
           "layer": one_layer, "stack_label": "tiny" if args.tiny else "Llama-7B-shaped"}
    run.meta["setup_s"] = time.perf_counter() - t_start

    run.add("peak probe", lambda: row_probe(ctx))
    run.add("forward smollm2", lambda: row_forward(ctx, smollm2, smollm2_label, sizes.forward))
    run.add("forward 7b-stack", lambda: row_forward(ctx, stack, stack_label, sizes.stack_forward))
    run.add("wanda 7b-layer", lambda: row_prune(ctx, "wanda"))
    run.add("sparsegpt 7b-layer", lambda: row_prune(ctx, "sparsegpt"))
    run.add("bonsai", lambda: rows_bonsai(ctx))
    for name, params, label in (("smollm2", smollm2, smollm2_label), ("7b-stack", stack, stack_label)):
        for b in (1, 16):
            run.add(f"decode {name} b{b}", lambda p=params, l=label, b=b: row_decode(ctx, p, l, b))
    run.write()

    text = "\n".join([f"Machine: {meta['machine']}; device {dev.platform} ({dev.device_kind}); models in "
                      f"{meta['dtype']}{'; tiny shapes' if args.tiny else ''}. Peaks: "
                      f"{peaks['bf16'] / 1e12:.3g} TFLOP/s bf16, {peaks['fp32'] / 1e12:.3g} TFLOP/s fp32, "
                      f"{peaks['hbm'] / 1e9:.4g} GB/s memory ({peaks['source']}). Total "
                      f"{time.perf_counter() - t_start:.0f} s.", "", run.markdown()])
    print(text)
    if args.write and not args.tiny:
        write_section(f"Accelerator run (benchmarks/gpu.py): {dev.device_kind}", text)


if __name__ == "__main__":
    main()
