"""Run reports: per-layer statistics for `report.json`, and `render` for plots + markdown.

Every `jaxprune prune` run writes `report.json` (method, settings, seed,
versions, timings, perplexity before/after, per-layer statistics; structured
runs also list the heads, FFN channels and sublayers removed). `render(runs,
out)` turns one or more runs into PNG plots and a `report.md`:

- `layers.png`: per decoder layer, the sparsity of each linear module and the
  fraction of its weight norm pruned (one-shot runs), or the fraction of heads
  and FFN channels kept and the sublayers removed (structured runs);
- `perplexity.png`: perplexity against sparsity (fraction of prunable weights, or
  of non-embedding parameters removed), one line per method and pattern, each
  starting at the dense model;
- `loss.png` (`jaxprune recover` runs): the distillation loss and the held-out
  perplexity (against the dense teacher's) per step.

Example:
    >>> import jax, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=2, num_attention_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> rows = layer_statistics(params, jp.magnitude(params, 0.5))
    >>> len(rows), rows[0]["sparsity"]
    (2, 0.5)
    >>> render(["runs/demo"], "runs/demo/report")        # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxprune.errors import CheckpointError, InvalidArgumentError


def row_chunks(w, keep, rows: int = 256):
    """(weight rows, mask rows) pairs, `rows` at a time, for `module_statistics`."""
    w, keep = np.asarray(w), np.asarray(keep, bool)
    for r in range(0, w.shape[0], rows):
        yield w[r:r + rows], keep[r:r + rows]


def module_statistics(chunks) -> tuple[dict, int, int]:
    """One weight's {"sparsity", "norm_removed"} (`||W * ~M||^2 / ||W||^2`), its size and its zeros,
    from (weight rows, mask rows) chunks, so a float32 copy of a large weight is never held whole."""
    total = removed = 0.0
    size = zeros = 0
    for w, keep in chunks:
        sq = np.square(np.asarray(w, np.float32))
        total += float(np.sum(sq))
        removed += float(np.sum(sq, where=~keep))
        size += keep.size
        zeros += int(keep.size - np.count_nonzero(keep))
    stats = {"sparsity": zeros / size if size else 0.0, "norm_removed": removed / total if total else 0.0}
    return stats, size, zeros


def layer_row(i: int, modules: dict, size: int, zeros: int) -> dict:
    """One entry of `layer_statistics`."""
    return {"layer": i, "sparsity": zeros / max(size, 1), "modules": modules}


def layer_statistics(params, masks) -> list[dict]:
    """Per decoder layer: overall sparsity and, per linear module, its sparsity and the fraction of
    the weight's squared norm that the mask removes (`||W * ~M||^2 / ||W||^2`), W the dense weight."""
    rows = []
    for i, (lp, lm) in enumerate(zip(params["layers"], masks["layers"])):
        modules, size, zeros = {}, 0, 0
        for path, w in jax.tree_util.tree_flatten_with_path(lp)[0]:
            if path[-1].key != "kernel":
                continue
            name = ".".join(k.key for k in path[:-1])
            modules[name], n, z = module_statistics(row_chunks(w, _get(lm, path)))
            size, zeros = size + n, zeros + z
        rows.append(layer_row(i, modules, size, zeros))
    return rows


def _get(tree, path):
    for k in path:
        tree = tree[k.key if hasattr(k, "key") else k.idx]
    return tree


def removed_units(gates: dict, num_layers: int) -> list[dict]:
    """Per decoder layer, what structured gates remove: kept/total heads (with the removed head
    indices), kept/total FFN channels, and whether the attention / MLP sublayer is gone."""
    def per_layer(key, i):
        g = gates.get(key)
        return None if g is None else np.asarray(g[i])

    rows = []
    for i in range(num_layers):
        row = {"layer": i}
        whole = per_layer("layer", i)
        gone = whole is not None and float(whole) == 0
        for kind in ("attn", "mlp"):
            g = per_layer(kind, i)
            row[f"{kind}_removed"] = bool(gone or (g is not None and float(g) == 0))
        heads = per_layer("heads", i)
        if heads is not None:
            row["heads_total"] = int(heads.size)
            row["heads_removed"] = [int(h) for h in np.flatnonzero(heads == 0)]
            row["heads_kept"] = 0 if row["attn_removed"] else int(np.count_nonzero(heads))
        ffn = per_layer("ffn", i)
        if ffn is not None:
            row["ffn_total"] = int(ffn.size)
            row["ffn_kept"] = 0 if row["mlp_removed"] else int(np.count_nonzero(ffn))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- rendering


def read_run(run_dir: str) -> dict:
    """The parsed `report.json` of a run directory (CheckpointError when missing or corrupt)."""
    path = os.path.join(run_dir, "report.json") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir}: no report.json (is it the --out directory of `jaxprune prune`?)")
    try:
        with open(path) as f:
            report = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt report.json ({e})") from None
    if not isinstance(report, dict) or "method" not in report:
        raise CheckpointError(f"{path}: not a jaxprune report (no 'method')")
    report["_dir"] = os.path.abspath(os.path.dirname(path))
    return report


def _label(r: dict) -> str:
    if r["method"] == "distill":
        t = r.get("training") or {}
        return "distill" + (f" LoRA r{t['lora_rank']}" if t.get("lora_rank") else "") + (
            f" top-{t['top_k']}" if t.get("top_k") else "")
    if "target" in r:
        return r["method"]
    return f"{r['method']} {r.get('pattern', 'unstructured')}" + (" +OWL" if r.get("owl") else "")


def _x(r: dict) -> float | None:
    """The run's sparsity for the perplexity plot."""
    if "non_embedding_params" in r:
        return r["non_embedding_params"]["removed_fraction"]
    s = r.get("sparsity_achieved", {}).get("prunable", r.get("sparsity"))
    return None if s is None else float(s)


def _plot_perplexity(runs: list[dict], path: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for r in runs:
        ppl, x = r.get("perplexity"), _x(r)
        if not ppl or x is None:
            continue
        pts = series.setdefault(_label(r), [])
        pts += [(0.0, ppl["dense"]), (x, ppl["pruned"])]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in sorted(series.items()):
        xs, ys = zip(*sorted(set(pts)))
        ax.plot(xs, ys, marker="o", label=label)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("sparsity (structured: fraction of non-embedding parameters removed)", fontsize=9)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("perplexity vs sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_layers(r: dict, path: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if r.get("layer_statistics"):
        rows = r["layer_statistics"]
        names = sorted({n for row in rows for n in row["modules"]})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for n in names:
            xs = [row["layer"] for row in rows if n in row["modules"]]
            axes[0].plot(xs, [row["modules"][n]["sparsity"] for row in rows if n in row["modules"]],
                         marker=".", label=n)
            axes[1].plot(xs, [row["modules"][n]["norm_removed"] for row in rows if n in row["modules"]],
                         marker=".", label=n)
        axes[0].set_ylabel("sparsity")
        axes[0].set_ylim(0, 1)
        axes[1].set_ylabel("fraction of weight norm² pruned")
        axes[1].legend(fontsize=7, ncol=2)
        title = f"{r['model']}: {_label(r)} at {r.get('sparsity')}"
    elif r.get("structure"):
        rows = r["structure"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        xs = [row["layer"] for row in rows]
        if any("heads_total" in row for row in rows):
            axes[0].bar(xs, [row.get("heads_kept", 0) / max(row.get("heads_total", 1), 1) for row in rows],
                        color="tab:blue")
        axes[0].set_ylabel("fraction of attention heads kept")
        if any("ffn_total" in row for row in rows):
            axes[1].bar(xs, [row.get("ffn_kept", 0) / max(row.get("ffn_total", 1), 1) for row in rows],
                        color="tab:orange")
        axes[1].set_ylabel("fraction of FFN channels kept")
        for ax, kind in zip(axes, ("attn", "mlp")):
            gone = [row["layer"] for row in rows if row.get(f"{kind}_removed")]
            ax.scatter(gone, [0.02] * len(gone), marker="x", color="red", zorder=3,
                       label=f"{kind} sublayer removed")
            ax.set_ylim(0, 1.05)
            if gone:
                ax.legend(fontsize=8)
        title = f"{r['model']}: {r['method']} removing {r.get('target')} of non-embedding parameters"
    else:
        return False
    for ax in axes:
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_training(r: dict, path: str) -> bool:
    """A recovery run's loss curve (training loss, KL part) and held-out perplexity per step."""
    history = r.get("history") or []
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_ppl" in h]
    if not train and not evals:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps, loss = [h["step"] for h in train], np.array([h["loss"] for h in train])
        axes[0].plot(steps, loss, marker="." if len(train) <= 50 else None, alpha=1.0 if len(train) <= 50 else 0.35,
                     label="loss")
        if len(train) > 50:      # a moving average over ~1/20 of the run
            w = max(2, len(train) // 20)
            axes[0].plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), label=f"mean of {w}")
        if any("hidden" in h for h in train):
            axes[0].plot([h["step"] for h in train], [h["kl"] for h in train], marker=".", label="KL part")
        axes[0].legend(fontsize=8)
    axes[0].set_ylabel("training loss")
    if evals:
        axes[1].plot([h["step"] for h in evals], [h["eval_ppl"] for h in evals], marker="o", label="student")
        dense = (r.get("perplexity") or {}).get("dense")
        if dense is not None:
            axes[1].axhline(dense, color="gray", linestyle="--", label=f"teacher {dense:.2f}")
        axes[1].legend(fontsize=8)
    axes[1].set_ylabel("held-out perplexity")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    name = lambda m: os.path.basename(os.path.normpath(str(m)))   # noqa: E731
    fig.suptitle(f"{name(r.get('model'))}: {_label(r)} towards {name(r.get('teacher'))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def _markdown(runs: list[dict], plots: list[str]) -> str:
    lines = ["# jaxprune report", "",
             "| run | model | method | sparsity | dense ppl | pruned ppl | prune time (s) | seed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ppl = r.get("perplexity") or {}
        lines.append(f"| {os.path.basename(r['_dir'])} | {r.get('model')} | {_label(r)} | {_fmt(_x(r))} | "
                     f"{_fmt(ppl.get('dense'), '.2f')} | {_fmt(ppl.get('pruned'), '.2f')} | "
                     f"{_fmt((r.get('timings') or {}).get('prune_s'), '.1f')} | {r.get('seed')} |")
    lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    for r in runs:
        lines += ["", f"## {os.path.basename(r['_dir'])}", ""]
        settings = {k: r[k] for k in ("method", "pattern", "sparsity", "target", "mode", "owl", "teacher", "seed")
                    if k in r}
        settings.update(r.get("training") or {})
        lines.append("- settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items()))
        if r.get("calibration"):
            c = r["calibration"]
            lines.append(f"- calibration: {c.get('n')} x {c.get('seqlen')} tokens of {', '.join(c.get('sources', []))}")
        if r.get("evaluation"):
            e = r["evaluation"]
            lines.append(f"- evaluation: {e.get('windows')} x {e.get('seqlen')} tokens of {e.get('text')}")
        ppl = r.get("perplexity") or {}
        if "recovered" in ppl:
            kl = r.get("kl_to_teacher") or {}
            lines.append(f"- recovery: held-out perplexity {ppl['pruned']:.2f} → {ppl['recovered']:.2f} "
                         f"(teacher {ppl['dense']:.2f}); KL to the teacher {_fmt(kl.get('pruned'), '.4f')} → "
                         f"{_fmt(kl.get('recovered'), '.4f')}")
        if r.get("versions"):
            lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
        if r.get("timings"):
            lines.append("- timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))
        removed = [row for row in r.get("structure") or [] if row.get("attn_removed") or row.get("mlp_removed")
                   or row.get("heads_removed") or row.get("ffn_kept", 0) < row.get("ffn_total", 0)]
        if removed:
            lines += ["", "| layer | heads removed | FFN channels kept | sublayers removed |", "|---|---|---|---|"]
            for row in removed:
                subs = [k for k in ("attn", "mlp") if row.get(f"{k}_removed")]
                ffn = f"{row['ffn_kept']}/{row['ffn_total']}" if "ffn_total" in row else "–"
                lines.append(f"| {row['layer']} | {row.get('heads_removed', '–')} | {ffn} | {', '.join(subs) or '–'} |")
    return "\n".join(lines) + "\n"


def render(run_dirs, out: str | None = None) -> dict:
    """Render plots and `report.md` for one or more run directories; returns the files written.

    Args:
      run_dirs: a run directory (holding `report.json`) or a list of them.
      out: output directory (default: `report/` inside the first run directory).

    Returns:
      {"dir": out, "markdown": path, "plots": [paths]}.
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise InvalidArgumentError("report needs at least one run directory")
    runs = [read_run(d) for d in run_dirs]
    out = os.path.abspath(out or os.path.join(runs[0]["_dir"], "report"))
    existed = os.path.isdir(out)
    try:   # written into a hidden sibling, then moved into place: never a half-written report
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-", dir=os.path.dirname(out))
    except OSError as e:
        raise CheckpointError(f"cannot write the report to {out}: {e.strerror}") from None
    try:
        files = _render_into(tmp, runs)
        _move_into_place(tmp, out, files, existed)
    except OSError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot write the report to {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": out, "markdown": os.path.join(out, "report.md"),
            "plots": [os.path.join(out, p) for p in files[:-1]]}


def _move_into_place(tmp: str, out: str, files: list[str], existed: bool) -> None:
    """A new `out` is the finished `tmp` renamed (all or nothing; if another process created `out`
    meanwhile, CheckpointError); into an `out` that existed each file is renamed over its old
    version, report.md last."""
    if not existed:
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.lexists(out):
            raise CheckpointError(f"{out} was created by another process while this report was rendered")
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not os.path.lexists(out):
                raise
            raise CheckpointError(f"{out} was created by another process while this report was rendered") from None
    for f in files:
        os.replace(os.path.join(tmp, f), os.path.join(out, f))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _render_into(out: str, runs: list[dict]) -> list[str]:
    """Write the plots and report.md into `out`; their names, report.md last."""
    plots = []
    if _plot_perplexity(runs, os.path.join(out, "perplexity.png")):
        plots.append("perplexity.png")
    for k, r in enumerate(runs):
        name = "layers.png" if len(runs) == 1 else f"layers-{k}-{os.path.basename(r['_dir'])}.png"
        if _plot_layers(r, os.path.join(out, name)):
            plots.append(name)
        name = "loss.png" if len(runs) == 1 else f"loss-{k}-{os.path.basename(r['_dir'])}.png"
        if _plot_training(r, os.path.join(out, name)):
            plots.append(name)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(_markdown(runs, plots))
    return plots + ["report.md"]


__all__ = ["layer_statistics", "read_run", "removed_units", "render"]
