"""The `jaxprune` command.

    jaxprune info [MODEL]                       architecture, shapes, parameter counts
    jaxprune eval [MODEL] [--text FILE] [--seqlen 512] [--max-windows N]
    jaxprune prune [MODEL] --method wanda|sparsegpt|magnitude --sparsity 0.5 [--pattern 2:4]
                   [--calib FILE ...] --out DIR
    jaxprune prune [MODEL] --method bonsai|finercut --target 0.3 --out DIR     (structured:
                   removes a fraction of non-embedding parameters; writes the smaller model)
    jaxprune prune HF_DIR --stream --method wanda|sparsegpt --out DIR      (one layer in memory
                   at a time; resumes an interrupted run; no evaluation)
    jaxprune recover MODEL_DIR --teacher DENSE --out DIR [--steps 200 --batch-size 4 --seqlen 256]
                   [--lora-rank r] [--top-k K] [--lr LR] [--checkpoint-dir DIR]   (distillation
                   towards the dense model; masks kept; resumes from --checkpoint-dir)
    jaxprune report RUN_DIR [RUN_DIR ...] [--out DIR]   (PNG plots + report.md of prune/recover runs)
    jaxprune generate [MODEL] --prompt TEXT [--max-new-tokens 64] [--temperature 0.8 --seed 0]
                   (KV-cached decoding; tokens stream to the terminal as they are made)

Scale: `--model-parallel N` runs one-shot methods on a ("data", "model") mesh of all devices
(calibration batches split over "data", weights over N-way "model"); `--coordinator HOST:PORT
--num-processes P --process-id I` (or JAXPRUNE_COORDINATOR / JAXPRUNE_NUM_PROCESSES /
JAXPRUNE_PROCESS_ID) starts JAX's multi-process runtime first; process 0 writes the output.

MODEL defaults to the bundled `smollm2-135m`; --text defaults to the bundled
`prideprejudice` (any bundled name, local file or `datasets` source works).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jaxprune.errors import CheckpointError, InvalidArgumentError, JaxpruneError

DEFAULT_MODEL = "smollm2-135m"


def parameter_counts(params) -> dict:
    """Total, embedding (token + position embeddings and an untied LM head) and non-embedding counts."""
    import jax
    tree = params.tree
    total = sum(x.size for x in jax.tree.leaves(tree))
    emb = sum(x.size for k in ("embed_tokens", "embed_positions", "lm_head") if k in tree
              for x in jax.tree.leaves(tree[k]))
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


def cmd_info(args) -> int:
    import jax
    from rich.console import Console
    from rich.table import Table

    from jaxprune.io.resolve import load

    params = load(args.model)
    cfg = params.config
    console = Console()
    counts = parameter_counts(params)
    console.print(f"[bold]{args.model}[/bold]: {cfg.arch}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                  f"{cfg.num_attention_heads} query heads / {cfg.num_key_value_heads} key-value heads "
                  f"(head dim {cfg.head_dim}), FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
                  f"tied embeddings: {cfg.tie_word_embeddings}")
    console.print(f"parameters: total {counts['total']:,}; embedding {counts['embedding']:,}; "
                  f"non-embedding {counts['non_embedding']:,}")
    table = Table(title="weights (layer 0 shown for per-layer tensors; kernels are [in, out])")
    table.add_column("tensor")
    table.add_column("shape")
    table.add_column("dtype")
    seen = set()
    for path, x in jax.tree_util.tree_flatten_with_path(params.tree)[0]:
        name = jax.tree_util.keystr(path)
        if path[0].key == "layers":
            if path[1].idx != 0:
                continue
            name = name.replace("['layers'][0]", "['layers'][i]")
        if name not in seen:
            seen.add(name)
            table.add_row(name, str(tuple(x.shape)), str(x.dtype))
    console.print(table)
    return 0


def cmd_eval(args) -> int:
    from jaxprune.data.text import eval_windows, read_text
    from jaxprune.evaluation.perplexity import perplexity
    from jaxprune.io.resolve import load, tokenizer

    t0 = time.perf_counter()
    params = load(args.model)
    tok = tokenizer(args.model)
    windows = eval_windows(tok, read_text(args.text), seqlen=args.seqlen, max_windows=args.max_windows)
    t1 = time.perf_counter()
    ppl = perplexity(params, windows, seqlen=args.seqlen, batch_size=args.batch_size, show_progress=None)
    t2 = time.perf_counter()
    print(f"model {args.model} | text {args.text} | {windows.shape[0]} windows x {args.seqlen} tokens | "
          f"perplexity {ppl:.3f} | load {t1 - t0:.1f}s, eval {t2 - t1:.1f}s")
    return 0


def cmd_prune(args) -> int:
    import json

    import jax
    from rich.console import Console
    from rich.table import Table

    from jaxprune.evaluation.perplexity import perplexity
    from jaxprune.io.export import save
    from jaxprune.sparsity.masks import apply_masks, summary
    from jaxprune.oneshot.owl import owl_sparsities
    from jaxprune.oneshot.pruning import magnitude, sparsegpt, wanda
    from jaxprune.report import layer_statistics

    if args.method in STRUCTURED:
        return cmd_prune_structured(args)
    _check_prune_args(args)
    if args.stream:
        return cmd_prune_streaming(args)
    console = Console(stderr=True)
    out = _check_out(args)
    timings = {}
    params, tok, calib_sources, calib, ev = _inputs(args, 32, args.seqlen, timings)
    console.print(f"[bold]{args.model}[/bold]: {args.method} {args.pattern or 'unstructured'} at sparsity "
                  f"{args.sparsity}, mode {args.mode}; calibration {calib.shape[0]} x {calib.shape[1]} tokens from "
                  f"{', '.join(calib_sources)}; evaluation {ev.shape[0]} x {ev.shape[1]} tokens of {args.eval_text}")
    t = time.perf_counter()
    dense_ppl = perplexity(params, ev, seqlen=args.seqlen, show_progress=args.progress)
    timings["eval_dense_s"] = time.perf_counter() - t
    t = time.perf_counter()
    per_layer = owl_sparsities(params, calib, args.sparsity) if args.owl else None
    mesh = _mesh(args)
    kw = dict(pattern=args.pattern, show_progress=args.progress, mesh=mesh)
    if args.method == "magnitude":
        masks = magnitude(params, args.sparsity, pattern=args.pattern, mesh=mesh)
        pruned = apply_masks(params, masks)
    elif args.method == "wanda":
        masks = wanda(params, calib, args.sparsity, mode=args.mode, per_layer_sparsity=per_layer, **kw)
        pruned = apply_masks(params, masks)
    else:
        pruned, masks = sparsegpt(params, calib, args.sparsity, mode=args.mode, per_layer_sparsity=per_layer, **kw)
    jax.block_until_ready(pruned)
    timings["prune_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pruned_ppl = perplexity(pruned, ev, seqlen=args.seqlen, show_progress=args.progress)
    timings["eval_pruned_s"] = time.perf_counter() - t
    s = summary(masks, prunable=lambda p: p[0].key == "layers" and p[-1].key == "kernel")
    report = {
        "model": args.model, "method": args.method, "pattern": args.pattern or "unstructured",
        "sparsity": args.sparsity, "mode": args.mode, "owl": args.owl, "per_layer_sparsity": per_layer,
        "seed": args.seed, "calibration": {"sources": calib_sources, "n": int(calib.shape[0]), "seqlen": args.seqlen},
        "evaluation": {"text": args.eval_text, "windows": int(ev.shape[0]), "seqlen": args.seqlen},
        "perplexity": {"dense": dense_ppl, "pruned": pruned_ppl},
        "sparsity_achieved": {"prunable": s["pruned_sparsity"], "all_params": s["total_sparsity"]},
        "timings": timings,
        "versions": _versions(),
    }
    report["devices"] = {"processes": jax.process_count(), "devices": jax.device_count(),
                         "mesh": dict(mesh.shape) if mesh is not None else None}
    if jax.process_count() > 1:
        from jaxprune.parallel.distributed import gather
        pruned, masks = gather(pruned), gather(masks)
        if jax.process_index() != 0:
            return 0
    report["layer_statistics"] = layer_statistics(params, masks)
    save(pruned, out, masks=masks, tokenizer=tok, overwrite=args.overwrite,
         extra_files={"report.json": json.dumps(report, indent=2)})
    table = Table(title=f"{args.model}: dense vs {args.method} ({args.pattern or 'unstructured'}, {args.sparsity:.0%})")
    for c in ("model", "sparsity of pruned layers", "perplexity", "time (s)"):
        table.add_column(c)
    table.add_row("dense", "0.0%", f"{dense_ppl:.2f}", f"{timings['eval_dense_s']:.1f} (eval)")
    table.add_row(args.method, f"{s['pruned_sparsity']:.1%}", f"{pruned_ppl:.2f}",
                  f"{timings['prune_s']:.1f} (prune) + {timings['eval_pruned_s']:.1f} (eval)")
    Console().print(table)
    print(f"wrote {out} (Hugging Face checkpoint, masks.safetensors, report.json); "
          f"plots: jaxprune report {args.out}")
    return 0


STRUCTURED = ("bonsai", "finercut")


def _versions() -> dict:
    import platform

    import jax

    from jaxprune import __version__
    return {"jaxprune": __version__, "jax": jax.__version__, "python": platform.python_version(),
            "backend": jax.default_backend()}


def _mesh(args):
    """The ("data", "model") mesh of all devices when asked (--model-parallel or several processes)."""
    import jax
    if args.model_parallel is None and jax.process_count() == 1:
        return None
    from jaxprune.parallel.distributed import make_mesh
    return make_mesh(model=args.model_parallel or 1)


def cmd_prune_streaming(args) -> int:
    """Wanda/SparseGPT on an HF checkpoint directory, one layer in memory at a time."""
    import json

    import numpy as np

    from jaxprune.data.text import CALIBRATION_TEXTS, calibration_windows, read_text
    from jaxprune.io.resolve import tokenizer
    from jaxprune.oneshot.streaming import prune_streaming, return_freed_memory

    if args.method not in ("wanda", "sparsegpt"):
        raise InvalidArgumentError(f"--stream prunes with wanda or sparsegpt, not {args.method}")
    if not os.path.isdir(args.model):
        raise CheckpointError(f"--stream reads a Hugging Face checkpoint directory; {args.model} is not one")
    out = _check_out(args)
    t = time.perf_counter()
    sources = args.calib or list(CALIBRATION_TEXTS)
    calib = calibration_windows(tokenizer(args.model), [read_text(c) for c in sources], n=args.n_calib or 32,
                                seqlen=args.seqlen, seed=args.seed)
    stats = []
    return_freed_memory()   # this process exists to stream one model: peak memory first
    prune_streaming(args.model, out, np.asarray(calib), args.method, args.sparsity, args.pattern, mode=args.mode,
                    overwrite=args.overwrite, show_progress=args.progress, statistics=stats)
    seconds = time.perf_counter() - t
    report = {"model": args.model, "method": args.method, "pattern": args.pattern or "unstructured",
              "sparsity": args.sparsity, "mode": args.mode, "streamed": True, "seed": args.seed,
              "calibration": {"sources": sources, "n": int(calib.shape[0]), "seqlen": args.seqlen},
              "timings": {"prune_s": seconds}, "versions": _versions(), "layer_statistics": stats}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out} (Hugging Face checkpoint, masks, report.json) in {seconds:.1f}s")
    return 0


def _inputs(args, n_calib_default: int, calib_seqlen: int, timings: dict):
    """Model, tokenizer, calibration sources and windows, evaluation windows (load time recorded)."""
    from jaxprune.data.text import CALIBRATION_TEXTS, calibration_windows, eval_windows, read_text
    from jaxprune.io.resolve import load, tokenizer
    t = time.perf_counter()
    params = load(args.model)
    tok = tokenizer(args.model)
    timings["load_s"] = time.perf_counter() - t
    sources = args.calib or list(CALIBRATION_TEXTS)
    calib = calibration_windows(tok, [read_text(c) for c in sources], n=args.n_calib or n_calib_default,
                                seqlen=calib_seqlen, seed=args.seed)
    ev = eval_windows(tok, read_text(args.eval_text), seqlen=args.seqlen, max_windows=args.eval_windows)
    return params, tok, sources, calib, ev


def _check_prune_args(args) -> None:
    """--sparsity, --pattern, --seqlen and --n-calib, checked before anything is loaded."""
    from jaxprune.sparsity.masks import check_sparsity, parse_pattern
    for flag, check in (("--sparsity", lambda: check_sparsity(args.sparsity)),
                        ("--pattern", lambda: parse_pattern(args.pattern))):
        try:
            check()
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{flag}: {e}") from None
    if args.seqlen < 2:
        raise InvalidArgumentError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.n_calib is not None and args.n_calib < 1:
        raise InvalidArgumentError(f"--n-calib must be at least 1, got {args.n_calib}")


def _check_out(args) -> str:
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write {out}: {parent} is not a writable directory")
    return out


def cmd_prune_structured(args) -> int:
    """Bonsai / FinerCut to `--target` of non-embedding parameters, then compaction and export."""
    import json

    import jax
    from rich.console import Console
    from rich.table import Table

    from jaxprune.structured.bonsai import bonsai
    from jaxprune.structured.compact import compact
    from jaxprune.evaluation.perplexity import perplexity
    from jaxprune.structured.finercut import finercut
    from jaxprune.io.export import save
    from jaxprune.report import removed_units
    from jaxprune.structured.units import non_embedding_params

    if args.target is None or not 0 < args.target < 1:
        raise InvalidArgumentError(f"--method {args.method} needs --target, a fraction in (0, 1) of non-embedding "
                            f"parameters to remove, got {args.target}")
    console = Console(stderr=True)
    out = _check_out(args)
    timings = {}
    params, tok, calib_sources, calib, ev = _inputs(args, 4, args.calib_seqlen, timings)
    console.print(f"[bold]{args.model}[/bold]: {args.method} removing {args.target:.0%} of non-embedding parameters; "
                  f"calibration {calib.shape[0]} x {calib.shape[1]} tokens from {', '.join(calib_sources)}")
    dense_n = non_embedding_params(params)
    t = time.perf_counter()
    if args.method == "bonsai":
        def report_round(r):
            console.print(f"round {r['round'] + 1}: {r['params_left']:,} non-embedding parameters left "
                          f"({r['removed_fraction']:.1%} removed)"
                          + (f", sub-model utility mean {r['utility_mean']:.3g}" if "utility_mean" in r else "")
                          + f", {r['seconds']:.1f}s")
        res = bonsai(params, calib, target=args.target, n_samples=args.samples, key=jax.random.key(args.seed),
                     show_progress=args.progress, callback=report_round)
        gates = res.gates
        details = [{k: v for k, v in r.items() if k != "gates"} for r in res.history]
    else:
        res = finercut(params, calib, target=args.target, show_progress=args.progress)
        gates = res.gates
        details = [{"removed": f"{kind} {i}", "divergence": d} for (kind, i), d in zip(res.order, res.divergences)]
        for row in details:
            console.print(f"removed {row['removed']} (JSD {row['divergence']:.4f})")
    small = compact(params, gates)
    jax.block_until_ready(small)
    timings["prune_s"] = time.perf_counter() - t
    small_n = non_embedding_params(small)
    t = time.perf_counter()
    dense_ppl = perplexity(params, ev, seqlen=args.seqlen, show_progress=args.progress)
    pruned_ppl = perplexity(small, ev, seqlen=args.seqlen, show_progress=args.progress)
    timings["eval_s"] = time.perf_counter() - t
    report = {"model": args.model, "method": args.method, "target": args.target, "seed": args.seed,
              "calibration": {"sources": calib_sources, "n": int(calib.shape[0]), "seqlen": int(calib.shape[1])},
              "evaluation": {"text": args.eval_text, "windows": int(ev.shape[0]), "seqlen": args.seqlen},
              "non_embedding_params": {"dense": dense_n, "pruned": small_n, "removed_fraction": 1 - small_n / dense_n},
              "perplexity": {"dense": dense_ppl, "pruned": pruned_ppl}, "steps": details,
              "structure": removed_units(gates, params.config.num_hidden_layers), "timings": timings,
              "versions": _versions()}
    save(small, out, tokenizer=tok, overwrite=args.overwrite, extra_files={"report.json": json.dumps(report, indent=2)})
    table = Table(title=f"{args.model}: dense vs {args.method} ({1 - small_n / dense_n:.1%} of non-embedding "
                        f"parameters removed)")
    for c in ("model", "non-embedding params", "perplexity"):
        table.add_column(c)
    table.add_row("dense", f"{dense_n:,}", f"{dense_ppl:.2f}")
    table.add_row(args.method, f"{small_n:,}", f"{pruned_ppl:.2f}")
    Console().print(table)
    print(f"wrote {out} (smaller Hugging Face checkpoint, report.json)")
    return 0


def _check_recover_args(args) -> None:
    """The numbers of `jaxprune recover`, checked before anything is loaded."""
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--n-calib", args.n_calib),
                        ("--lora-rank", args.lora_rank), ("--top-k", args.top_k), ("--eval-every", args.eval_every),
                        ("--eval-windows", args.eval_windows), ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{flag} must be a positive integer, got {value}")
    if args.seqlen < 2:
        raise InvalidArgumentError(f"--seqlen must be at least 2, got {args.seqlen}")
    for flag, value in (("--lr", args.lr), ("--temperature", args.temperature)):
        if value is not None and not value > 0:
            raise InvalidArgumentError(f"{flag} must be positive, got {value}")


def cmd_recover(args) -> int:
    """Distil a pruned or compacted model towards the dense teacher; write it with report.json."""
    import json

    import jax
    from rich.console import Console
    from rich.table import Table

    from jaxprune.data.text import CALIBRATION_TEXTS, calibration_windows, eval_windows, read_text
    from jaxprune.evaluation.perplexity import perplexity
    from jaxprune.io.export import load_masks, save
    from jaxprune.io.resolve import load, tokenizer
    from jaxprune.structured.units import non_embedding_params
    from jaxprune.training.distill import distill

    _check_recover_args(args)
    console = Console(stderr=True)
    out = _check_out(args)
    timings = {}
    t = time.perf_counter()
    student, teacher, tok = load(args.model), load(args.teacher), tokenizer(args.model)
    has_masks = os.path.isdir(args.model) and os.path.isfile(os.path.join(args.model, "masks.safetensors"))
    masks = load_masks(args.model, student) if has_masks else None
    timings["load_s"] = time.perf_counter() - t
    sources = args.calib or list(CALIBRATION_TEXTS)
    calib = calibration_windows(tok, [read_text(c) for c in sources], n=args.n_calib, seqlen=args.seqlen,
                                seed=args.seed)
    ev = eval_windows(tok, read_text(args.eval_text), seqlen=args.seqlen, max_windows=args.eval_windows)
    console.print(f"[bold]{args.model}[/bold] towards [bold]{args.teacher}[/bold]: {args.steps} steps x "
                  f"{args.batch_size} windows of {args.seqlen} tokens from {', '.join(sources)} "
                  f"({'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full weights'}"
                  f"{', masks kept' if masks is not None else ''}"
                  f"{', teacher top-%d' % args.top_k if args.top_k else ''}); evaluation {ev.shape[0]} x "
                  f"{ev.shape[1]} tokens of {args.eval_text}")
    t = time.perf_counter()
    dense_ppl = perplexity(teacher, ev, seqlen=args.seqlen, show_progress=args.progress)
    timings["eval_dense_s"] = time.perf_counter() - t

    def show(rec):
        if "eval_ppl" in rec:
            console.print(f"step {rec['step']}: held-out perplexity {rec['eval_ppl']:.2f}, KL to the teacher "
                          f"{rec['eval_kl']:.4f}" + (f", training loss {rec['loss']:.4f}" if "loss" in rec else ""))

    t = time.perf_counter()
    res = distill(student, teacher, calib, key=jax.random.key(args.seed), steps=args.steps,
                  batch_size=args.batch_size, temperature=args.temperature, teacher_top_k=args.top_k, masks=masks,
                  lora_rank=args.lora_rank, lr=args.lr, eval_calib=ev, eval_every=args.eval_every,
                  checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                  log_every=max(1, args.steps // 500), show_progress=args.progress, callback=show)
    jax.block_until_ready(res.params)
    timings["train_s"] = time.perf_counter() - t
    evals = [r for r in res.history if "eval_ppl" in r]
    before, after = evals[0], evals[-1]
    report = {"model": args.model, "method": "distill", "teacher": args.teacher, "seed": args.seed,
              "training": {"steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen,
                           "lora_rank": args.lora_rank, "top_k": args.top_k, "lr": args.lr,
                           "temperature": args.temperature, "masks": masks is not None},
              "calibration": {"sources": sources, "n": int(calib.shape[0]), "seqlen": args.seqlen},
              "evaluation": {"text": args.eval_text, "windows": int(ev.shape[0]), "seqlen": args.seqlen},
              "parameters": {"teacher_non_embedding": non_embedding_params(teacher),
                             "student_non_embedding": non_embedding_params(student)},
              "perplexity": {"dense": dense_ppl, "pruned": before["eval_ppl"], "recovered": after["eval_ppl"]},
              "kl_to_teacher": {"pruned": before["eval_kl"], "recovered": after["eval_kl"]},
              "resumed_from": res.resumed_from, "history": res.history, "timings": timings, "versions": _versions()}
    save(res.params, out, masks=masks, tokenizer=tok, overwrite=args.overwrite,
         extra_files={"report.json": json.dumps(report, indent=2)})
    table = Table(title=f"{args.model}: recovery by distillation ({args.steps} steps)")
    for c in ("model", "perplexity", "KL to the teacher"):
        table.add_column(c)
    table.add_row("teacher (dense)", f"{dense_ppl:.2f}", "0")
    table.add_row("pruned", f"{before['eval_ppl']:.2f}", f"{before['eval_kl']:.4f}")
    table.add_row("recovered", f"{after['eval_ppl']:.2f}", f"{after['eval_kl']:.4f}")
    Console().print(table)
    print(f"wrote {out} (Hugging Face checkpoint{', masks' if masks is not None else ''}, report.json); "
          f"loss curve: jaxprune report {args.out}")
    return 0


def cmd_generate(args) -> int:
    import jax

    from jaxprune.generation import generate
    from jaxprune.io.resolve import load, tokenizer as load_tokenizer

    params, tok = load(args.model), load_tokenizer(args.model)
    prompt = args.prompt
    ids = list(tok.encode(prompt))
    if not ids:
        raise InvalidArgumentError("--prompt encodes to no tokens")
    eos = tok.eos_token_id
    stops = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    made: list[int] = []
    shown = [""]

    def on_token(step, new):                       # called from inside the compiled loop
        t = int(new[0])
        if t < 0 or t in stops:
            return
        made.append(t)
        text = tok.decode(made)
        if not text.endswith("\ufffd"):          # wait for a whole character
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    sys.stdout.write(prompt)
    sys.stdout.flush()
    key = jax.random.key(args.seed) if args.temperature > 0 else None
    generate(params, [ids], args.max_new_tokens, key=key, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, stop_token_ids=stops, on_token=on_token)
    sys.stdout.write(tok.decode(made)[len(shown[0]):] + "\n")
    return 0


def cmd_report(args) -> int:
    from jaxprune.report import render
    res = render(args.runs, args.out)
    print(f"wrote {res['markdown']} and {len(res['plots'])} plot(s): "
          + ", ".join(os.path.basename(p) for p in res["plots"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxprune", description="Prune large language models in JAX.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="architecture, shapes and parameter counts of a model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="name, HF directory, .gguf file or hub id")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("eval", help="perplexity of a model on a text")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--text", default="prideprejudice", help="bundled text name, text file or datasets source")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("prune", help="one-shot pruning; writes a checkpoint and report.json")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--method", choices=("wanda", "sparsegpt", "magnitude") + STRUCTURED, default="wanda")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--target", type=float, default=None,
                   help="bonsai/finercut: fraction of non-embedding parameters to remove")
    p.add_argument("--samples", type=int, default=32, help="bonsai: sub-models evaluated per round")
    p.add_argument("--calib-seqlen", type=int, default=128, help="bonsai/finercut: calibration window length")
    p.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (default: unstructured)")
    p.add_argument("--mode", choices=("sequential", "as-you-go", "dense"), default="sequential")
    p.add_argument("--owl", action="store_true", help="outlier-weighted layer-wise sparsity (OWL)")
    p.add_argument("--calib", nargs="+", help="calibration texts (default: bundled emma, mansfieldpark)")
    p.add_argument("--n-calib", type=int, default=None, help="calibration windows (default 32; bonsai/finercut 4)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-text", default="prideprejudice")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--out", required=True, help="output directory (HF checkpoint)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")
    p.add_argument("--stream", action="store_true",
                   help="wanda/sparsegpt on an HF directory, one layer in memory at a time (resumable)")
    p.add_argument("--model-parallel", type=int, default=None,
                   help="run on a (data, model) mesh of all devices with this tensor-parallel size")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0 (or 'auto')")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("recover", help="distil a pruned or compacted model towards the dense teacher")
    p.add_argument("model", help="the pruned model: HF directory (its masks.safetensors are kept), .gguf or name")
    p.add_argument("--teacher", required=True, help="the dense model (same tokenizer)")
    p.add_argument("--out", required=True, help="output directory (HF checkpoint + report.json)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4, help="windows per step")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (training and evaluation)")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank (merged at the end)")
    p.add_argument("--top-k", type=int, default=None, help="cache the teacher's top-K logits once (bounded memory)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4; LoRA 1e-3)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", nargs="+", help="training texts (default: bundled emma, mansfieldpark)")
    p.add_argument("--n-calib", type=int, default=256, help="training windows drawn from the texts")
    p.add_argument("--eval-text", default="prideprejudice")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (default steps/10)")
    p.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints; a killed run resumes from here")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")
    p.set_defaults(func=cmd_recover)
    p = sub.add_parser("report", help="plots (PNG) and a markdown summary of one or more prune/recover runs")
    p.add_argument("runs", nargs="+", help="run directories (the --out of `jaxprune prune`, with report.json)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report of the first run)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("generate", help="continue a prompt (KV-cached decoding, streamed to the terminal)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="random seed when sampling")
    p.set_defaults(func=cmd_generate)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "coordinator", None) or os.environ.get("JAXPRUNE_COORDINATOR"):
            from jaxprune.parallel.multihost import initialize
            initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                       getattr(args, "process_id", None))
        return args.func(args)
    except JaxpruneError as e:
        print(f"jaxprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
