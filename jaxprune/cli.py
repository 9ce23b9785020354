"""The `jaxprune` command.

    jaxprune info [MODEL]                       architecture, shapes, parameter counts
    jaxprune eval [MODEL] [--text FILE] [--seqlen 512] [--max-windows N]

MODEL defaults to the bundled `smollm2-135m`; --text defaults to the bundled
`prideprejudice` (any bundled name, local file or `datasets` source works).
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import JaxpruneError

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

    from .io.resolve import load

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
    from .data import eval_windows, read_text
    from .evaluate import perplexity
    from .io.resolve import load, tokenizer

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
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxpruneError as e:
        print(f"jaxprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
