"""The whole journey on SmolLM2: structured pruning -> compact -> distillation -> GGUF -> llama.cpp.

    python -m benchmarks.payoff [--levels 0.2,0.3] [--methods finercut,bonsai,l0,ffn] [--steps 48]
                                [--batch-size 8] [--seqlen 128] [--top-k 64] [--work runs/payoff]

1. Prune SmolLM2-135M-Instruct (float32) to each level of non-embedding parameters removed with
   FinerCut (2 calibration windows of 128 tokens, as benchmarks/structured.py), Bonsai (32
   sub-models per round, rounds of 5%, 4 x 128 calibration tokens), L0 (gates only, the
   weights untouched, 200 steps x 4 x 128 training tokens) and, as the uniform baseline that
   llama.cpp's plain `llama` architecture runs, FFN channels by Bonsai's prior alone (the same
   share of every layer's channels, lowest activation x weight norm first); calibration from
   emma + mansfieldpark (seed 0; L0's training windows seed 1). `jaxprune.compact` each.
2. Recover every compacted model by distillation from the dense model (`jaxprune.distill`: KL on
   next-token distributions, the teacher's top-K cached once for all students, full weights,
   AdamW), on random 128-token windows of emma + mansfieldpark (seed 1); the held-out windows
   that `distill` evaluates as it goes come from northangerabbey. The control: the dense model
   given the same training (teacher = itself), so adaptation to the author is not counted as
   recovery (with a pure KL objective there is none to gain; the control shows it).
3. Evaluate the perplexity on the first 64 x 512 windows of prideprejudice (the evaluation text,
   used for nothing else) before and after recovery; "gap closed" is
   (before - after) / (before - best dense), best dense being the lower of the dense model's and
   the control's perplexity (so a control that training made worse cannot flatter the gap).
4. Export every model with `jaxprune.save(..., "x.gguf")` (float32) and run it in llama.cpp
   (llama-cpp-python, same build, same thread count, same process): prompt-processing and
   generation tokens/s of a 128-token prompt and 128 greedy tokens (batch 1), and llama.cpp's
   own perplexity on the first 4 evaluation windows as a check of the export. jaxprune's own
   prefill and decode tokens/s (its KV-cached engine, batch 1) are measured beside it.

Every stage caches its result under --work (gates, recovered checkpoints, GGUF files, figures
in results.json), so a rerun continues where the last one stopped; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp
from benchmarks.common import best_of, machine, write_section
from jaxprune.generation import decode
from jaxprune.structured import non_embedding_params

PROMPT, NEW = 128, 128
LABELS = {"finercut": "FinerCut", "bonsai": "Bonsai", "l0": "L0 (gates only)", "ffn": "FFN prior (uniform)"}


def label(name: str) -> str:
    """'finercut-30%' -> 'FinerCut 30%'; other names unchanged."""
    method, _, level = name.rpartition("-")
    return f"{LABELS[method]} {level}" if method in LABELS else name


# ---------------------------------------------------------------- cache

class Work:
    """A directory of cached stage results: results.json (figures) and files."""

    def __init__(self, path: str, fresh: bool):
        if fresh and os.path.isdir(path):
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.file = os.path.join(path, "results.json")
        self.data = json.load(open(self.file)) if os.path.exists(self.file) else {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        tmp = self.file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.file)

    def sub(self, *parts) -> str:
        return os.path.join(self.path, *parts)


def save_gates(path, gates):
    np.savez(path, **{k: np.asarray(v) for k, v in gates.items()})


def load_gates(path):
    with np.load(path) as z:
        return {k: jnp.asarray(z[k]) for k in z.files}


# ---------------------------------------------------------------- stage 1: prune

def prune_all(work, params, calib, train, levels, methods, l0_steps):
    """{(method, level): gates}, each run once and cached as .npz with its removed fraction and time."""
    from benchmarks.structured import snapshot_at
    os.makedirs(work.sub("gates"), exist_ok=True)
    out = {}

    def cached(method, level):
        f = work.sub("gates", f"{method}-{level:.2f}.npz")
        return f, os.path.exists(f) and work.get(f"prune/{method}/{level:.2f}")

    top = max(levels)
    bonsai_runs = {"bonsai": dict(n_samples=32, key=jax.random.key(0)),          # heads and FFN channels
                   "ffn": dict(n_samples=0, kinds=("ffn",))}                     # prior alone: uniform FFN widths
    for method, options in bonsai_runs.items():
        if method in methods and not all(cached(method, lv)[1] for lv in levels):
            t = time.perf_counter()
            log = lambda r: print(f"  {method} round {r['round'] + 1}: {r['removed_fraction']:.3f} removed, "
                                  f"{r['seconds']:.0f}s", flush=True)
            res = jp.bonsai(params, calib, target=top, show_progress=False, callback=log, **options)
            seconds = time.perf_counter() - t
            for lv in levels:
                gates, rec = snapshot_at(res.history, lv)
                save_gates(cached(method, lv)[0], gates)
                upto = sum(r["seconds"] for r in res.history if r["round"] <= rec["round"])
                work.put(f"prune/{method}/{lv:.2f}", {"seconds": upto, "run_seconds": seconds})
    if "finercut" in methods:
        if not all(cached("finercut", lv)[1] for lv in levels):
            t = time.perf_counter()
            fc = jp.finercut(params, calib[:2], target=top, show_progress=False,
                             callback=lambda r: print(f"  finercut removal: {r['removed_fraction']:.3f}", flush=True))
            seconds = time.perf_counter() - t
            dense_n = non_embedding_params(params)
            for lv in levels:
                k = int(np.searchsorted(np.asarray(fc.params_removed), lv * dense_n - 0.5) + 1)
                save_gates(cached("finercut", lv)[0], fc.gates_after(k))
                work.put(f"prune/finercut/{lv:.2f}", {"seconds": seconds * k / len(fc.order), "run_seconds": seconds,
                                                       "removals": k})
    if "l0" in methods:
        for lv in levels:
            f, done = cached("l0", lv)
            if done:
                continue
            t = time.perf_counter()
            res = jp.l0_prune(params, train, target=lv, steps=l0_steps, batch_size=4, train_params=False,
                              key=jax.random.key(0), show_progress=False,
                              callback=lambda r: print(f"  l0 {lv:.0%} step {r['step']}: loss {r.get('loss', 0):.3f}",
                                                       flush=True) if r["step"] % 50 == 0 else None)
            save_gates(f, res.gates)
            work.put(f"prune/l0/{lv:.2f}", {"seconds": time.perf_counter() - t, "steps": l0_steps})
    for m in methods:
        for lv in levels:
            out[(m, lv)] = load_gates(cached(m, lv)[0])
    return out


# ---------------------------------------------------------------- stage 2: recover

def recover(work, name, student, teacher, train, held_out, top_k, args):
    """The distilled student (cached as an HF directory) and its record."""
    path = work.sub("recovered", name)
    rec = work.get(f"recover/{name}")
    if rec and os.path.isdir(path):
        return jp.load(path), rec
    t = time.perf_counter()
    log = lambda r: print(f"  {name} step {r['step']}: " + ", ".join(
        f"{k} {r[k]:.3f}" for k in ("loss", "eval_kl", "eval_ppl") if r.get(k) is not None), flush=True)
    res = jp.distill(student, teacher, train, key=jax.random.key(1), steps=args.steps, batch_size=args.batch_size,
                     teacher_top_k=top_k, lr=args.lr, eval_calib=held_out, eval_every=max(1, args.steps // 4),
                     log_every=max(1, args.steps // 10), checkpoint_dir=work.sub("checkpoints", name),
                     checkpoint_every=max(1, args.steps // 4), show_progress=False,
                     callback=lambda r: log(r) if "eval_kl" in r else None)
    seconds = time.perf_counter() - t
    jp.save(res.params, path, overwrite=True)
    shutil.rmtree(work.sub("checkpoints", name), ignore_errors=True)
    rec = {"seconds": seconds, "history": [{k: v for k, v in r.items() if isinstance(v, (int, float)) or v is None}
                                           for r in res.history]}
    work.put(f"recover/{name}", rec)
    return res.params, rec


# ---------------------------------------------------------------- stage 4: runtimes

def llama_cpp_figures(gguf_path, prompt, windows, threads):
    """llama.cpp prompt-processing and generation tokens/s (best of 3) and its perplexity on `windows`."""
    from llama_cpp import Llama
    llm = Llama(model_path=gguf_path, n_ctx=max(PROMPT + NEW, windows.shape[1]) + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=512, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        logits = np.asarray(llm.scores[: len(w) - 1], np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        nll += float(np.sum(lse - logits[np.arange(len(w) - 1), w[1:]]))
        count += len(w) - 1
    ppl = float(np.exp(nll / count))
    llm = Llama(model_path=gguf_path, n_ctx=PROMPT + NEW + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, logits_all=False, verbose=False)
    prompt = [int(t) for t in prompt]

    def run():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(NEW):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        return t1 - t0, time.perf_counter() - t1

    run()  # warm-up
    times = [run() for _ in range(3)]
    return {"pp_tps": PROMPT / min(t[0] for t in times), "tg_tps": NEW / min(t[1] for t in times),
            "llama_cpp_ppl": ppl}


def jaxprune_speed(params, prompt):
    """jaxprune's own prefill and decode tokens/s (batch 1, KV cache; compilation excluded)."""
    prompts = [[int(t) for t in prompt]]
    decode(params, prompts, 1)
    decode(params, prompts, NEW)
    t1 = best_of(lambda: decode(params, prompts, 1), 3)
    tn = best_of(lambda: decode(params, prompts, NEW), 3)
    return {"prefill_tps": PROMPT / t1, "decode_tps": (NEW - 1) / (tn - t1)}


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="0.2,0.3")
    ap.add_argument("--methods", default="finercut,bonsai,l0,ffn")
    ap.add_argument("--l0-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=200, help="distillation steps per model")
    ap.add_argument("--batch-size", type=int, default=8, help="distillation windows per step")
    ap.add_argument("--seqlen", type=int, default=128, help="distillation window length")
    ap.add_argument("--train-windows", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=64, help="teacher top-k cached for distillation")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--work", default="runs/payoff")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the table without writing RESULTS.md")
    ap.add_argument("--redo-speed", action="store_true",
                    help="measure the speeds again (e.g. on an idle machine), keeping the cached models")
    args = ap.parse_args()
    levels = [float(x) for x in args.levels.split(",")]
    methods = args.methods.split(",")
    work = Work(args.work, args.fresh)
    if args.redo_speed:
        for k in [k for k in work.data if k.startswith("speed/")]:
            del work.data[k]
    t_all = time.perf_counter()

    dense = jp.load("smollm2-135m")
    tok = jp.tokenizer("smollm2-135m")
    novels = [jp.bundled_text(n) for n in jp.data.CALIBRATION_TEXTS]
    calib = jp.calibration_windows(tok, novels, n=4, seqlen=128, seed=0)
    train = jp.calibration_windows(tok, novels, n=args.train_windows, seqlen=args.seqlen, seed=1)
    held_out = jp.calibration_windows(tok, jp.bundled_text("northangerabbey"), n=8, seqlen=args.seqlen, seed=0)
    ev = jp.eval_windows(tok, jp.bundled_text(jp.data.EVALUATION_TEXT), seqlen=512, max_windows=args.eval_windows)
    prompt = jp.eval_windows(tok, jp.bundled_text(jp.data.EVALUATION_TEXT), seqlen=PROMPT, max_windows=1)[0]
    dense_n = non_embedding_params(dense)

    def ppl(key, params):
        v = work.get(f"ppl/{key}")
        if v is None:
            v = jp.perplexity(params, ev, seqlen=512)
            work.put(f"ppl/{key}", v)
        return v

    print("stage 1: structured pruning", flush=True)
    gates = prune_all(work, dense, calib, train, levels, methods, args.l0_steps)

    print("stage 2: distillation", flush=True)
    from jaxprune.training.teacher import teacher_top_k
    t = time.perf_counter()
    top_k = teacher_top_k(dense, train, args.top_k)
    top_k_seconds = time.perf_counter() - t
    models = {"dense": ("dense", dense, None)}      # label -> (cache key, params, recovery record)
    control, rec = recover(work, "dense-control", dense, dense, train, held_out, top_k, args)
    models["dense + same training (control)"] = ("dense-control", control, rec)
    pruned = {}
    for m in methods:
        for lv in levels:
            name = f"{m}-{lv:.0%}"
            small = jp.compact(dense, gates[(m, lv)])
            pruned[name] = small
            ppl(f"{name}/before", small)
            models[name] = (name, *recover(work, name, small, dense, train, held_out, top_k, args))

    print("stage 3/4: evaluation, GGUF, llama.cpp", flush=True)
    rows = {}
    os.makedirs(work.sub("gguf"), exist_ok=True)
    for name, (key, params, rec) in models.items():
        gguf = work.sub("gguf", f"{key}.gguf")
        if not os.path.exists(gguf):
            jp.save(params, gguf, tokenizer=tok, dtype="float32", overwrite=True)
        r = {"params": non_embedding_params(params), "gguf_mb": os.path.getsize(gguf) / 2**20,
             "config": "uniform" if params.config.layer_shapes is None else "per-layer (deci)"}
        r["ppl_after"] = ppl(f"{key}/after", params)
        if name in pruned:
            r["ppl_before"] = work.get(f"ppl/{name}/before")
        r.update(work.get(f"speed/{key}") or {})
        if "tg_tps" not in r:
            fig = {**llama_cpp_figures(gguf, prompt, np.asarray(ev[:4]), args.threads), **jaxprune_speed(params, prompt)}
            work.put(f"speed/{key}", fig)
            r.update(fig)
        r["recover_seconds"] = rec["seconds"] if rec else None
        rows[name] = r
        print(name, {k: v for k, v in r.items()}, flush=True)

    d, c = rows["dense"], rows["dense + same training (control)"]
    lines = [f"Machine: {machine()}; llama-cpp-python {__import__('llama_cpp').__version__} built from source, "
             f"{args.threads} threads.",
             f"SmolLM2-135M-Instruct float32 ({dense_n:,} non-embedding parameters). Pruning: FinerCut (2 x 128 "
             "calibration tokens), Bonsai (32 sub-models per round, rounds of 5%, 4 x 128 tokens), L0 (gates only, "
             f"{args.l0_steps} steps x 4 x 128 tokens), FFN prior (Bonsai's prior alone on FFN channels: every "
             "layer keeps the same width, so the GGUF is plain `llama`), then `jp.compact`. Recovery: `jp.distill` from the dense "
             f"model, {args.steps} steps x {args.batch_size} x {args.seqlen} = "
             f"{args.steps * args.batch_size * args.seqlen:,} tokens of emma + mansfieldpark per model (teacher "
             f"top-{args.top_k} cached once in {top_k_seconds:.0f} s), full weights, AdamW lr {args.lr:g}, "
             "held-out windows from northangerabbey. Perplexity: first "
             f"{ev.shape[0]} x 512 windows of prideprejudice (llama.cpp's: first 4). Speed: 128-token prompt, 128 "
             "greedy tokens, batch 1, best of 3, each model as a float32 GGUF (`jp.save`) in llama.cpp and in "
             "jaxprune's KV-cached engine, all in one run.",
             "",
             "| model | removed | GGUF (MB) | ppl before | ppl after recovery | gap closed | llama.cpp ppl | "
             "llama.cpp pp tok/s | llama.cpp tg tok/s | tg vs dense | jaxprune prefill tok/s | jaxprune decode tok/s "
             "| recovery (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    target = min(d["ppl_after"], c["ppl_after"])   # the better of dense and control: never flatters the gap
    for name, r in rows.items():
        before = r.get("ppl_before")
        gap = (before - r["ppl_after"]) / (before - target) if before else None
        cells = [label(name), f"{1 - r['params'] / dense_n:.1%}", f"{r['gguf_mb']:.0f}", fmt(before, ".2f"),
                 f"{r['ppl_after']:.2f}", fmt(gap, ".0%"), f"{r['llama_cpp_ppl']:.2f}", f"{r['pp_tps']:,.0f}",
                 f"{r['tg_tps']:.1f}", f"{r['tg_tps'] / d['tg_tps']:.2f}x", f"{r['prefill_tps']:,.0f}",
                 f"{r['decode_tps']:.1f}", fmt(r["recover_seconds"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    prune_times = "; ".join(f"{m} {lv:.0%}: {work.get(f'prune/{m}/{lv:.2f}')['seconds']:.0f} s"
                            for m in methods for lv in levels)
    lines += ["", f"Pruning times: {prune_times}. Whole run (this invocation, cached stages excluded): "
              f"{time.perf_counter() - t_all:.0f} s.",
              "Removed: fraction of non-embedding parameters. Gap closed: (before - after) / (before - best dense), "
              "best dense being the better of the dense model and the control. "
              "'ppl after recovery' of the dense row is the untrained model."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("Payoff: structured pruning, distillation, llama.cpp (benchmarks/payoff.py)", text)


if __name__ == "__main__":
    main()
