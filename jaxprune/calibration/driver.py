"""The layer-by-layer calibration driver: `LayerPruner` runs the sequential, as-you-go and
dense passes of one-shot pruning over one decoder layer at a time, in memory
(`run_layerwise`) or from disk (`jaxprune.oneshot.streaming`).
"""

from __future__ import annotations

import collections
import gc
from typing import Callable
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxprune import models
from jaxprune.models.layout import SUBLAYERS
from jaxprune.errors import InvalidArgumentError, check_int
from jaxprune.core.params import Params, get_path, set_path
from jaxprune.core.progress import progress
from jaxprune.calibration.capture import MODES, _dense_interceptor, blocked_matmuls, capture, input_groups, input_stat


def prune_layer(lp: dict, stats: dict, count, rule: Callable, counts: dict):
    """Prune the linear layers of one layer's params `lp` named by the keys of `stats`
    ({module path: summed statistic}) with the prune rule `rule` (see `run_layerwise`); `counts`
    holds each module's prune counts (`rule.counts`). Returns (new lp, {module path: keep mask})."""
    masks = {}
    for path, stat in stats.items():
        new, masks[path] = rule(path, get_path(lp, path), stat, count, counts[path])
        lp = set_path(lp, path, new)
    return lp, masks


def prune_counts(rule, lp: dict, paths, sparsity: float) -> dict:
    """{module path: `rule.counts(kernel shape, sparsity)`} on the host (exact Python arithmetic)."""
    return {path: rule.counts(tuple(np.shape(get_path(lp, path)["kernel"])), sparsity) for path in paths}


def _trim_heap() -> None:
    """glibc's malloc_trim(0): give freed heap memory back to the OS (no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None

# A layer's temporaries are returned to the OS eagerly (a full cycle collection: ~0.1-1 s in a big
# process) only when the layer holds at least this many bytes; below it they are too small to matter.
COLLECT_ABOVE_BYTES = 32 << 20


def layer_bytes(lp) -> int:
    """Bytes held by a layer's arrays."""
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(lp))


def collect_if_large(nbytes: int) -> None:
    """gc.collect() and glibc's malloc_trim(0) when `nbytes` (the layer's) reaches COLLECT_ABOVE_BYTES."""
    if nbytes >= COLLECT_ABOVE_BYTES:
        gc.collect()
        _trim_heap()


def _family_layer(config, lp, x, ctx, kg, layer_type):
    kw = {} if layer_type is None else {"layer_type": layer_type}
    return models.family(config).layer(config, lp, x, ctx, {}, kg, **kw)


def _apply_layer(lp, x, ctx, config, kg, layer_type=None, blocked: bool = False):
    """Decoder layer `lp` of a model with `config` on x (`kg`: the layer's K/V grouping,
    `layer_type`: its `models.layer_type`); with `blocked`, every matmul in blocks of output
    columns (`blocked_matmuls`, op by op)."""
    if blocked:
        return blocked_matmuls(lambda: _family_layer(config, lp, x, ctx, kg, layer_type))
    return _family_layer(config, lp, x, ctx, kg, layer_type)


def _stats_and_output(lp, x, ctx, config, kg, kind, layer_type=None, blocked: bool = False):
    # blocked matmuls innermost: the capture interceptor (outer) must see each input first
    return capture(lambda: _apply_layer(lp, x, ctx, config, kg, layer_type, blocked), kind)


def _stats_only(lp, x, ctx, config, kg, kind, layer_type=None, blocked: bool = False):
    return _stats_and_output(lp, x, ctx, config, kg, kind, layer_type, blocked)[1]


def _prune_one(dense, stat, count, n, rule, path):
    return rule(path, dense, stat, count, n)


def _prune_group(denses, stat, count, ns, rule):
    return rule.prune_group(denses, stat, count, ns)


def _dense_from(x, params):
    """A linear layer {"kernel", "bias"?} on x, the kernel cast to x's dtype."""
    y = jnp.dot(x, params["kernel"].astype(x.dtype))
    return y + params["bias"].astype(y.dtype) if "bias" in params else y


def _one_pass(lp, X, ctx, counts, config, kg, kind, rule, target, layer_type=None):
    """As-you-go: each targeted linear layer pruned the moment its input arrives."""
    new_lp, masks = lp, {}

    def on_dense(path, module, x, call):
        nonlocal new_lp
        if path not in target:
            return call()
        st = input_stat(kind, x) if kind else None
        new, masks[path] = rule(path, get_path(lp, path), st, x.size // x.shape[-1], counts[path])
        new_lp = set_path(new_lp, path, new)
        return _dense_from(x, new)

    with nn.intercept_methods(_dense_interceptor(on_dense)):
        Y = _family_layer(config, lp, X, ctx, kg, layer_type)
    return new_lp, masks, Y


def _stage_pass(lp, x, ctx, ins, outs, stage, config, kg, kind, layer_type=None, keep_outputs=()):
    """One chunk of one as-you-go stage: the modules of finished stages compute from their cached
    inputs (`ins`) with lp's (pruned) weights, or give their cached outputs (`outs`), so XLA drops the
    work that produced those. Returns (the input that `stage`'s modules share, its statistic,
    {path: output} of the modules in `keep_outputs` computed here from a cached input), or, for the
    empty stage, the layer's output."""
    found, computed = [], {}

    def on_dense(path, module, xin, call):
        if path in outs:
            return outs[path]
        if path in ins:
            y = _dense_from(ins[path], module.variables["params"])
            if path in keep_outputs:
                computed[path] = y
            return y
        if path in stage and not found:
            found.append(xin)
        return call()

    with nn.intercept_methods(_dense_interceptor(on_dense)):
        y = _family_layer(config, lp, x, ctx, kg, layer_type)
    if not stage:
        return y
    return found[0], (input_stat(kind, found[0]) if kind else None), computed


def _residual_writers(config) -> tuple:
    """Module paths of the layers' output projections (o_proj, down_proj, fc2: `Layout.output_projection`),
    which write the residual stream: a later as-you-go pass needs their outputs, not their inputs."""
    try:
        layout = models.layout_of(config)
    except KeyError:
        return ()
    return tuple(layout.output_projection(kind).path for kind in SUBLAYERS)


# The compiled passes, built once: everything that selects a program (the config, the layer's K/V
# grouping, the statistic, the prune rule, the targeted modules) is a static, hashable argument, and
# prune counts are traced, so JAX's own cache serves every later call, layer and sparsity.
_LAYER_STATIC = ("config", "kg", "layer_type")
_run_jit = jax.jit(_apply_layer, static_argnames=_LAYER_STATIC + ("blocked",))
_stats_and_output_jit = jax.jit(_stats_and_output, static_argnames=_LAYER_STATIC + ("kind", "blocked"))
_stats_only_jit = jax.jit(_stats_only, static_argnames=_LAYER_STATIC + ("kind", "blocked"))
_prune_one_jit = jax.jit(_prune_one, static_argnames=("rule", "path"))
_prune_one_donating_jit = jax.jit(_prune_one, static_argnames=("rule", "path"), donate_argnums=(0,))
_prune_group_jit = jax.jit(_prune_group, static_argnames=("rule",))
_one_pass_jit = jax.jit(_one_pass, static_argnames=_LAYER_STATIC + ("kind", "rule", "target"))
_stage_pass_jit = jax.jit(_stage_pass, static_argnames=_LAYER_STATIC + ("kind", "stage", "keep_outputs"))


class LayerPruner:
    """The passes of sequential one-shot pruning for one decoder layer at a time.

    Calibration activations are a list of chunks [b, T, D] (one per forward batch), so
    each chunk can carry its own sharding (rows over a mesh's ``"data"`` axis) and
    statistics of all chunks add up. `step` prunes one layer and returns the next
    layer's input; `run_layerwise` (in memory) and `jaxprune.oneshot.streaming` (one layer
    from disk at a time) both drive it. With `donate=True` each kernel's buffer is
    reused for its pruned version (for layers the caller owns, as in streaming). With
    `jit_passes=False` the layer's forward passes run op by op (each matmul its own compiled
    call), so at most one weight matrix's temporaries exist at a time: on CPU, XLA upcasts
    bfloat16 matmuls to float32 and a whole-layer program would hold every upcast weight at once.

    `prune_dense` is a prune rule (see `run_layerwise`). The jitted passes are module-level
    functions with static config, K/V grouping, statistic kind and rule, and a traced prune
    count, so a second pruner for the same model, and every layer whatever its sparsity,
    reuses the programs already compiled.
    """

    def __init__(self, config, kind: str | None, prune_dense: Callable, mode: str = "sequential",
                 donate: bool = False, jit_passes: bool = True):
        if not isinstance(mode, str) or mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
        self.config, self.kind, self.prune_dense, self.mode = config, kind, prune_dense, mode
        self.donate, self.jit_passes = donate, jit_passes
        self._prune_one = _prune_one_donating_jit if donate else _prune_one_jit
        self._groups = {}
        self._residual_writers = _residual_writers(config)

    def _pass(self, jitted, plain, lp, x, ctx, kg, **static):
        if self.jit_passes:
            return jitted(lp, x, ctx, config=self.config, kg=kg, **static)
        return plain(lp, x, ctx, config=self.config, kg=kg, blocked=True, **static)

    def run(self, lp, X: list, ctx, kg, layer_type=None) -> list:
        """The layer applied to every chunk (`layer_type`: `models.layer_type(config, i)`, needed
        where a model mixes layer types)."""
        out = []
        for x in X:
            out.append(self._pass(_run_jit, _apply_layer, lp, x, ctx, kg, layer_type=layer_type))
            self._collect(lp)
        return out

    def stats(self, lp, X: list, ctx, kg, with_output: bool = False, layer_type=None):
        """(outputs or None, {module path: statistic summed over all chunks})."""
        # In dense mode the statistics pass also yields the next input; otherwise only the
        # statistics are returned and XLA drops work that only feeds the layer output (the
        # down projection), so the reference's first pass costs less than a full forward.
        outs, total = [], None
        for x in X:
            if with_output:
                y, st = self._pass(_stats_and_output_jit, _stats_and_output, lp, x, ctx, kg, kind=self.kind,
                                   layer_type=layer_type)
                outs.append(y)
            else:
                st = self._pass(_stats_only_jit, _stats_only, lp, x, ctx, kg, kind=self.kind, layer_type=layer_type)
            total = st if total is None else jax.tree.map(jnp.add, total, st)
            self._collect(lp)
        return (outs if with_output else None), total

    def prune(self, lp, stats: dict, count, sparsity: float, take_mask=None, groups=()):
        """Prune the linear layers named by `stats`, one matrix per call (peak memory: one matrix's
        temporaries), or one call per group of `groups` (paths sharing one input, see
        `input_groups`) where the rule prunes such groups together (`rule.prune_group`). Returns
        (new lp, {module path: keep mask}); with `take_mask(path, keep)` each mask is handed over
        as soon as it exists and not kept."""
        masks = {}
        counts = prune_counts(self.prune_dense, lp, stats, sparsity)
        calls_of = collections.Counter(p for g in groups for p in g)   # a module called on two inputs is solved alone
        joint = [g for g in (tuple(p for p in g if p in stats and calls_of[p] == 1) for g in groups) if len(g) > 1]
        grouped = {p for g in joint for p in g}
        calls = sorted([(p,) for p in stats if p not in grouped] + joint)
        for group in calls:
            if len(group) > 1:
                results = _prune_group_jit(tuple(get_path(lp, p) for p in group), stats[group[0]], count,
                                           tuple(counts[p] for p in group), rule=self.prune_dense)
            else:
                path = group[0]
                host = getattr(self.prune_dense, "prune_host", None)   # a selection faster on the host
                result = host(get_path(lp, path), stats[path], count, counts[path]) if host else None
                if result is None:
                    key = path if getattr(self.prune_dense, "uses_path", True) else None   # one compilation per shape
                    result = self._prune_one(get_path(lp, path), stats[path], count, counts[path],
                                             rule=self.prune_dense, path=key)
                results = [result]
            for path, (new, keep) in zip(group, results):
                if take_mask is None:
                    masks[path] = keep
                else:
                    take_mask(path, keep)
                del keep
                lp = set_path(lp, path, new)
            del results
            self._collect(lp)
        return lp, masks

    def groups(self, lp, x, ctx, kg, layer_type=None) -> tuple:
        """Paths of the layer's linear layers grouped by shared input, when the prune rule solves
        such groups together and kernels are not donated (a group's solve holds all its kernels'
        temporaries at once); else ()."""
        if self.donate or not hasattr(self.prune_dense, "prune_group"):
            return ()
        return self._input_groups(lp, x, ctx, kg, layer_type)

    def _input_groups(self, lp, x, ctx, kg, layer_type):
        """`input_groups` of the layer, found by an abstract trace, cached per layer structure."""
        key = (kg, layer_type, jax.tree.structure(lp))
        if key not in self._groups:
            found = []
            jax.eval_shape(lambda lp, x: found.append(input_groups(
                lambda: _family_layer(self.config, lp, x, ctx, kg, layer_type))), lp, x)
            self._groups[key] = found[0]
        return self._groups[key]

    def stages(self, lp, x, ctx, kg, target, layer_type=None):
        """As-you-go stages: the targeted modules grouped by the input they share, in call order
        (q/k/v, o, gate/up, down), or None when a targeted module is called more than once (its
        input is not one tensor: such layers run as one pass over all chunks at once)."""
        groups = self._input_groups(lp, x, ctx, kg, layer_type)
        calls = collections.Counter(p for g in groups for p in g)
        if any(calls[p] != 1 for p in target):
            return None
        return tuple(s for s in (tuple(p for p in g if p in target) for g in groups) if s)

    def _staged(self, lp, X: list, ctx, kg, stages, sparsity, count, take_mask, layer_type, need_output):
        """As-you-go chunk by chunk: for each stage in call order, its shared input and statistic from
        every chunk (earlier stages' modules computing from their cached inputs with pruned weights),
        then its modules pruned (together where the rule solves groups). A module that writes the
        residual stream (o_proj) is computed once from its cached input and its output kept for the
        passes after. Costs about one forward of the layer plus the cached activations' memory."""
        ins = [{} for _ in X]
        outs = [{} for _ in X]
        masks = {}
        groups = self.groups(lp, X[0], ctx, kg, layer_type)
        for stage in stages:
            total = None
            keep = tuple(p for p in self._residual_writers if p in ins[0])   # computed here from cached inputs
            for c, x in enumerate(X):
                xin, st, computed = _stage_pass_jit(lp, x, ctx, ins[c], outs[c], config=self.config, kg=kg,
                                                    kind=self.kind, stage=stage, layer_type=layer_type,
                                                    keep_outputs=keep)
                for path, y in computed.items():
                    outs[c][path] = y
                    del ins[c][path]
                ins[c].update(dict.fromkeys(stage, xin))
                total = st if total is None else jax.tree.map(jnp.add, total, st)
            lp, stage_masks = self.prune(lp, dict.fromkeys(stage, total), count, sparsity, take_mask, groups)
            masks.update(stage_masks)
            del total
        if not need_output:
            return lp, masks, X
        Y = [_stage_pass_jit(lp, x, ctx, ins[c], outs[c], config=self.config, kg=kg, kind=self.kind, stage=(),
                             layer_type=layer_type) for c, x in enumerate(X)]
        return lp, masks, Y

    def _collect(self, lp):
        """In the low-memory configuration, return finished calls' temporaries now: on CPU they are
        released only when Python's cycle collector runs, and freed heap pages stay with the
        process until glibc is asked to trim them (skipped for small layers: `collect_if_large`)."""
        if self.donate or not self.jit_passes:
            collect_if_large(layer_bytes(lp))

    def step(self, lp, X: list, ctx, kg, sparsity: float, target: frozenset, count, take_mask=None,
             layer_type=None, need_output: bool = True):
        """Prune one layer from its input chunks X; returns (new lp, masks, next layer's input chunks).

        `take_mask(path, keep)`, if given, receives each mask as soon as it exists and step returns
        {} for them, so the caller can store them compactly and free them. `layer_type` is the
        layer's `models.layer_type` (needed where types differ). With `need_output=False` (the last
        layer) a layer left unpruned, or one pruned in sequential mode, is not run again and X comes
        back unchanged."""
        if not target:
            return lp, {}, (self.run(lp, X, ctx, kg, layer_type) if need_output else X)
        if self.mode == "as-you-go":
            stages = self.stages(lp, X[0], ctx, kg, target, layer_type) if self.jit_passes else None
            if stages is not None:
                return self._staged(lp, X, ctx, kg, stages, sparsity, count, take_mask, layer_type, need_output)
            sizes = [x.shape[0] for x in X]
            counts = prune_counts(self.prune_dense, lp, target, sparsity)
            new_lp, masks, Y = _one_pass_jit(lp, jnp.concatenate(X), ctx, counts, config=self.config, kg=kg,
                                             kind=self.kind, rule=self.prune_dense, target=frozenset(target),
                                             layer_type=layer_type)
            return new_lp, masks, list(jnp.split(Y, np.cumsum(sizes)[:-1]))
        Y, stats = self.stats(lp, X, ctx, kg, with_output=(self.mode == "dense"), layer_type=layer_type)
        new_lp, masks = self.prune(lp, {p: v for p, v in stats.items() if p in target}, count, sparsity, take_mask,
                                   self.groups(lp, X[0], ctx, kg, layer_type))
        nbytes = layer_bytes(lp)
        del lp, stats
        if self.donate or not self.jit_passes:
            collect_if_large(nbytes)
        if self.mode == "sequential":
            return new_lp, masks, (self.run(new_lp, X, ctx, kg, layer_type) if need_output else X)
        return new_lp, masks, Y


_embed_jit = jax.jit(models.embed)

# Calibration tokens per forward on a CPU backend when the caller gives no batch size. A SmolLM2 layer
# (2-core EPYC, float32, 16,384 tokens) ran 15% faster in chunks of 1,024 tokens than of 4,096: a
# chunk's activations stay in cache between the layer's ops. Accelerators get DEVICE_BATCH windows.
CPU_CHUNK_TOKENS = 1024
DEVICE_BATCH = 8


def default_batch_size(seqlen: int, batch_size: int | None = None) -> int:
    """`batch_size` (windows per forward) if given, checked to be a positive int, else the default
    for windows of `seqlen` tokens: on CPU, as many whole windows as fit CPU_CHUNK_TOKENS (at least
    one, at most DEVICE_BATCH); elsewhere DEVICE_BATCH.

    Example:
        >>> default_batch_size(512, 3)
        3
    """
    if batch_size is not None:
        return check_int("batch_size", batch_size)
    if jax.default_backend() != "cpu":
        return DEVICE_BATCH
    return max(1, min(DEVICE_BATCH, CPU_CHUNK_TOKENS // max(1, int(seqlen))))


def embed_chunks(params: Params, tokens, batch_size: int, place=None):
    """(list of embedded chunks [b, T, D], context) for tokens [n, T] in chunks of `batch_size`;
    `place(chunk)` puts each token chunk on devices first (e.g. rows over a mesh)."""
    n = tokens.shape[0]
    bs = max(1, min(batch_size, n))
    xs, ctx = [], None
    for s in range(0, n, bs):
        chunk = tokens[s:s + bs]
        x, ctx = _embed_jit(params, place(chunk) if place else chunk)
        xs.append(x)
    return xs, ctx


def run_layerwise(params: Params, tokens, kind: str | None, prune_dense: Callable, sparsities, targets,
                  mode: str = "sequential", batch_size: int | None = None, show_progress=None,
                  description: str = "pruning", place=None):
    """Drive one-shot pruning layer by layer.

    `prune_dense` is a prune rule: a hashable object (equal rules compile the same programs, e.g.
    `jaxprune.oneshot.pruning.WandaRule`) with

    * ``counts(kernel_shape, sparsity)``: the number(s) of entries to prune (Python ints, or a tuple
      of them), computed on the host;
    * ``rule(path, dense, stat, count, n) -> (new dense params, keep mask)``: prunes one linear
      layer (`dense` = {"kernel", "bias"?}) from its summed input statistic over `count` tokens,
      `n` being its counts, traced (int32): one compilation serves every sparsity;
    * ``uses_path``: whether the result depends on `path` (if not, one compilation per shape);
    * optionally ``prune_group(denses, stat, count, ns)``: layers sharing one input pruned together,
      and ``prune_host(dense, stat, count, n)``: `rule` computed on the host, or None where it does not
      apply (the compiled `rule` then runs).

    `sparsities[i]` is layer i's target and `targets[i]` the set of module paths
    (e.g. ('self_attn', 'q_proj')) to prune in layer i. Modes:

    * ``sequential`` (the reference): statistics from the layer as it is, prune, then re-run the
      pruned layer to produce the next layer's input (two passes per layer);
    * ``as-you-go``: each linear layer is pruned as soon as its input statistics are complete, so
      later sublayers see earlier ones already pruned; about one pass per layer (`LayerPruner.stages`:
      each group of layers sharing an input is one stage run chunk by chunk, finished stages'
      layers computing from their cached inputs);
    * ``dense``: statistics of the unpruned model (the next input is the dense layer's output).

    `batch_size` windows run per forward (default: `default_batch_size`). `place(token_chunk)` places
    each calibration chunk (data parallelism: rows over a mesh's ``"data"`` axis; the jitted passes
    then reduce statistics across devices).

    Returns (new layer param list, list of {module path: keep mask}).
    """
    pruner = LayerPruner(params.config, kind, prune_dense, mode)
    tokens = tokens if isinstance(tokens, jax.Array) else jnp.asarray(tokens)
    X, ctx = embed_chunks(params, tokens, default_batch_size(tokens.shape[1], batch_size), place)
    new_layers, layer_masks = [], []
    count = jnp.asarray(float(tokens.size), jnp.float32)
    layers = params.tree["layers"]
    for i in progress(range(len(layers)), description, total=len(layers), enabled=show_progress):
        new_lp, masks, X = pruner.step(layers[i], X, ctx, models.kv_groups(params.config, i),
                                       float(sparsities[i]), frozenset(targets[i]), count,
                                       layer_type=models.layer_type(params.config, i),
                                       need_output=i < len(layers) - 1)
        new_layers.append(new_lp)
        layer_masks.append(masks)
    return new_layers, layer_masks
