"""Recovery by distillation: train a pruned or compacted student towards the dense teacher.

Each step draws `batch_size` calibration windows (`batch_indices`: a pure function of the key
and the step, so a resumed run sees the same data) and minimises

    mean over positions of KL(teacher || student) at `temperature`      (`losses.kl_divergence`)
    + hidden_weight * mean over layer pairs of MSE(student state, teacher state)   (optional)

The teacher's logits come from its own compiled forward each step, or, with
``teacher_top_k=K``, from a cache computed once (`teacher.teacher_top_k`: per position the
teacher's K most likely tokens, their log-probabilities and the log-probability of all the
others); the loss is then `losses.top_k_kl`: the KL between teacher and student coarsened to
those K tokens plus one bucket for the rest (the student's probabilities from its full softmax;
zero at the teacher, at most the full KL, exactly the full KL when K is the vocabulary size).
The hidden-state loss compares the residual streams after decoder layers
``(student_layer, teacher_layer)`` (default: the last of each, before the final norm); widths
must agree.

The student keeps its shapes (any widths and depth, e.g. `jaxprune.compact`'s output) and, with
`masks`, its sparsity: full-weight training applies `keep_masked` after the optimiser; LoRA
(`lora_rank=r`) trains masked adapters (`lora.lora_merge`) and returns them merged. The default
optimiser is AdamW (weight decay on matrices only) after gradient clipping at norm 1, with a
linear warm-up and a cosine decay to a tenth of `lr` (`lr_schedule`; the rate enters the
compiled step as a number, so it compiles once for any rate and length); any optax
transformation may replace it.
With `eval_calib` the student's perplexity and its KL to the teacher on those held-out windows
are recorded before training, every `eval_every` steps and at the end. With `checkpoint_dir`
the weights, optimiser state, step and history go to orbax every `checkpoint_every` steps
(`train_state`); the same call with the same `checkpoint_dir` continues from the last
checkpoint and ends with exactly the weights of an uninterrupted run.

Example:
    >>> import jax, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> teacher = jax.tree.map(lambda x: 4 * x if x.ndim == 2 else x, jp.init(cfg, jax.random.key(0)))
    >>> student = jp.compact(teacher, {"ffn": jax.numpy.ones((2, 64)).at[:, 32:].set(0)})
    >>> calib = jax.random.randint(jax.random.key(1), (12, 16), 0, 64)
    >>> res = distill(student, teacher, calib[:8], key=jax.random.key(0), steps=10, batch_size=4, lr=3e-3,
    ...               eval_calib=calib[8:], eval_every=10, show_progress=False)
    >>> res.params["layers"][0]["mlp"]["up_proj"]["kernel"].shape, [r["step"] for r in res.history]
    ((32, 32), [0, 9, 10])
    >>> res.history[-1]["eval_kl"] < res.history[0]["eval_kl"]
    True
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import models
from jaxprune.core.checks import check_tokens
from jaxprune.core.params import Params
from jaxprune.core.progress import progress
from jaxprune.errors import CheckpointError, InvalidArgumentError, check_int
from jaxprune.oneshot.pruning import default_prunable
from jaxprune.sparsity.masks import apply_masks, check_masks_like
from jaxprune.training import train_state
from jaxprune.training.losses import hidden_mse, kl_divergence, token_nll, top_k_kl
from jaxprune.training.lora import lora_init, lora_merge
from jaxprune.training.masked import keep_masked
from jaxprune.training import teacher as teacher_lib
from jaxprune.training.teacher import TopK, depth, outputs, teacher_targets

__all__ = ["DistillResult", "batch_indices", "default_optimizer", "distill", "distill_objective", "held_out",
           "lr_schedule"]


class DistillResult(NamedTuple):
    params: Params              # the trained student (LoRA merged), same shapes, masked weights zero
    history: list               # one record per logged / evaluated step (see `distill`)
    adapters: dict | None       # the LoRA adapters (None for full-weight training)
    resumed_from: int | None    # the checkpoint step this call continued from, if any


class _Settings(NamedTuple):    # static (hashable) settings of the compiled step
    temperature: float
    student_layers: tuple
    hidden_weight: float
    lora_alpha: float | None


def lr_schedule(lr: float, steps: int, warmup: int):
    """``step -> learning rate`` (a Python float): linear warm-up from 0 to `lr` over `warmup` steps,
    then cosine decay to ``lr / 10`` at `steps`."""
    def at(step: int) -> float:
        if step < warmup:
            return lr * step / warmup
        frac = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 * lr + 0.9 * lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return at


def _decay_mask(tree):
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


@functools.lru_cache(maxsize=16)
def default_optimizer(weight_decay: float = 0.01) -> optax.GradientTransformation:
    """AdamW without its learning rate: clip the gradient's global norm at 1, Adam's direction, plus
    decoupled weight decay on 2-D leaves (kernels, embeddings, adapters; not norms or biases).
    `distill` scales each step's update by ``-lr_schedule(...)(step)`` (a traced scalar, as
    `optax.adamw` would inside), so other learning rates and lengths reuse the compiled step."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                       optax.add_decayed_weights(weight_decay, mask=_decay_mask))


def distill_objective(student: Params, batch, targets: dict, temperature: float = 1.0, student_layers: tuple = (),
                      hidden_weight: float = 0.0):
    """(loss, parts) of `student` on `batch` [B, T] against teacher `targets`: ``{"logits": [B, T, V]}``
    or top-k ``{"log_probs", "indices": [B, T, K], "log_rest": [B, T]}`` (`teacher.TopK`), plus
    ``"hidden"``: the teacher states matching the student's `student_layers` (traceable,
    differentiable in the student)."""
    logits, hidden = outputs(student, batch, student_layers)
    if "logits" in targets:
        kl = jnp.mean(kl_divergence(targets["logits"], logits, temperature))
    else:
        kl = jnp.mean(top_k_kl(targets["log_probs"], targets["indices"], targets["log_rest"], logits, temperature))
    parts = {"kl": kl}
    loss = kl
    if student_layers:
        parts["hidden"] = sum(hidden_mse(s, t) for s, t in zip(hidden, targets["hidden"])) / len(hidden)
        loss = loss + hidden_weight * parts["hidden"]
    parts["loss"] = loss
    return loss, parts


def _student(trainable, base, masks, config, lora_alpha):
    if base is None:
        return Params(config, trainable)
    return lora_merge(Params(config, base), trainable, masks, lora_alpha)


@partial(jax.jit, static_argnames=("optimizer", "config", "settings"))
def _distill_step(trainable, opt_state, base, masks, batch, targets, lr, *, optimizer, config, settings):
    """One update of the trainable pytree (full weights when `base` is None, else LoRA adapters
    over `base`); the optimizer's update is scaled by ``-lr`` unless `lr` is None (an optimizer with
    its own learning rate). Compiled once per optimizer, config, settings and shapes."""
    def objective(tr):
        return distill_objective(_student(tr, base, masks, config, settings.lora_alpha), batch, targets,
                                 settings.temperature, settings.student_layers, settings.hidden_weight)

    grads, parts = jax.grad(objective, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    if lr is not None:
        updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    if masks is not None and base is None:
        updates, _ = keep_masked(masks).update(updates, optax.EmptyState(), trainable)
    return optax.apply_updates(trainable, updates), opt_state, parts


@jax.jit
def _eval_sums(student, teacher, tokens, weight):
    s, t = models.logits(student, tokens), models.logits(teacher, tokens)
    return (jnp.sum(token_nll(s, tokens).sum(axis=1) * weight),
            jnp.sum(kl_divergence(t, s).sum(axis=1) * weight))


def held_out(student: Params, teacher: Params, windows, batch_size: int = 4) -> dict:
    """``{"eval_ppl": perplexity of the student (`jaxprune.perplexity`'s protocol), "eval_kl": mean
    per-position KL(teacher || student) at temperature 1}`` over int windows [N, T]."""
    windows = np.asarray(windows, np.int32)
    n, T = windows.shape
    nll = kl = 0.0
    for s in range(0, n, batch_size):
        batch = windows[s:s + batch_size]
        m = len(batch)
        weight = (np.arange(batch_size) < m).astype(np.float32)
        if m < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - m, T), np.int32)])
        a, b = _eval_sums(student, teacher, jnp.asarray(batch), jnp.asarray(weight))
        nll, kl = nll + float(a), kl + float(b)
    return {"eval_ppl": math.exp(nll / (n * (T - 1))), "eval_kl": kl / (n * T)}


def batch_indices(key, step: int, n: int, batch_size: int) -> np.ndarray:
    """The windows of step `step`: `batch_size` of `n` drawn with ``fold_in(key, step)`` (without
    replacement when there are enough): a pure function of (key, step), so resuming replays them."""
    idx = jax.random.choice(jax.random.fold_in(key, step), n, (batch_size,), replace=batch_size > n)
    return np.asarray(idx)


# ----------------------------------------------------------------------------- input checks


def _key_data(key) -> list:
    if key is None:
        raise InvalidArgumentError("distill draws batches (and LoRA adapters): pass key=jax.random.key(seed) "
                                   "(no default seed)")
    try:
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(key)).ravel().tolist()
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return np.asarray(key).tolist()
    except AttributeError:
        pass
    raise InvalidArgumentError(f"key must be a jax.random key (jax.random.key(seed)), got {type(key).__name__}")


def _hidden_pairs(student: Params, teacher: Params, hidden_layers, hidden_weight: float) -> tuple:
    if hidden_weight == 0:
        if hidden_layers is not None:
            raise InvalidArgumentError("hidden_layers needs hidden_weight > 0 (the weight of the hidden-state loss)")
        return ()
    Ls, Lt = depth(student), depth(teacher)
    pairs = []
    for pair in hidden_layers if hidden_layers is not None else [(-1, -1)]:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in pair)):
            raise InvalidArgumentError(f"hidden_layers must be (student_layer, teacher_layer) pairs of ints, "
                                       f"got {pair!r}")
        s, t = int(pair[0]), int(pair[1])
        if not (-Ls <= s < Ls and -Lt <= t < Lt):
            raise InvalidArgumentError(f"hidden layer pair {tuple(pair)} is out of range: the student has {Ls} layers, "
                                       f"the teacher {Lt}")
        pairs.append((s % Ls, t % Lt))
    if not pairs:
        raise InvalidArgumentError("hidden_layers is empty; leave it None for the final hidden state")
    ds, dt = student.config.hidden_size, teacher.config.hidden_size
    if ds != dt:
        raise InvalidArgumentError(f"the hidden-state loss needs equal widths: student hidden size {ds}, teacher {dt} "
                                   f"(a compacted hidden dimension cannot be matched; set hidden_weight=0)")
    return tuple(pairs)


def _top_k_setting(teacher_top_k, calib: np.ndarray, vocab: int, temperature: float):
    if teacher_top_k is None or isinstance(teacher_top_k, TopK):
        if isinstance(teacher_top_k, TopK):
            lp, i, r, t = teacher_top_k
            if (np.shape(lp) != np.shape(i) or np.ndim(lp) != 3 or tuple(np.shape(lp)[:2]) != calib.shape
                    or np.shape(r) != calib.shape or not 1 <= np.shape(lp)[2] <= vocab):
                raise InvalidArgumentError(f"the teacher_top_k cache has shapes {np.shape(lp)}, {np.shape(r)}, the "
                                           f"calibration windows {calib.shape}: compute it with "
                                           f"teacher_top_k(teacher, calib, k, temperature)")
            if t != temperature:
                raise InvalidArgumentError(f"the teacher_top_k cache was computed at temperature {t}, "
                                           f"not {temperature}")
        return teacher_top_k
    k = check_int("teacher_top_k", teacher_top_k)
    if k > vocab:
        raise InvalidArgumentError(f"teacher_top_k must be at most the vocabulary size {vocab}, got {k}")
    return k


def _number(name: str, value, low: float = 0.0, strict: bool = True) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(x) or x < low or (strict and x == low):
        raise InvalidArgumentError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return x


def _check_models(student, teacher) -> None:
    for name, p in (("student", student), ("teacher", teacher)):
        if not isinstance(p, Params):
            raise InvalidArgumentError(f"distill: {name} must be jaxprune Params (jp.load / jp.compact), "
                                       f"got {type(p).__name__}")
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise InvalidArgumentError(f"student and teacher vocabularies differ: {vs} vs {vt} tokens")


def _windows(student, teacher, tokens, what: str) -> np.ndarray:
    check_tokens(teacher.config, tokens, what=what, error=InvalidArgumentError)
    return check_tokens(student.config, tokens, what=what, error=InvalidArgumentError)


# ----------------------------------------------------------------------------- the loop


def distill(student: Params, teacher: Params, calib, *, key=None, steps: int = 200, batch_size: int = 4,
            temperature: float = 1.0, teacher_top_k: int | TopK | None = None, hidden_weight: float = 0.0,
            hidden_layers=None, masks=None, lora_rank: int | None = None, lora_alpha: float = 16.0,
            lora_targets=default_prunable, lr: float | None = None, warmup: int | None = None,
            weight_decay: float = 0.01, optimizer: optax.GradientTransformation | None = None,
            eval_calib=None, eval_every: int | None = None, checkpoint_dir: str | None = None,
            checkpoint_every: int | None = None, log_every: int = 10, show_progress: bool | None = None,
            callback=None) -> DistillResult:
    """Train `student` towards `teacher` on `calib` windows by KL distillation; see the module docstring.

    Args:
      student: `Params` to train (pruned, masked or compacted; any widths and depth), same vocabulary
        as `teacher` (the dense model, fixed).
      calib: int windows [N, T]; step s trains on `batch_indices(key, s, N, batch_size)`.
      key: `jax.random` key (required): data order and LoRA initialisation.
      steps, batch_size: optimiser steps and windows per step.
      temperature: softmax temperature of both distributions (the loss is scaled by its square).
      teacher_top_k: K: cache the teacher's top-K distribution once (`losses.top_k_kl`); or a `TopK`
        from `teacher.teacher_top_k(teacher, calib, K, temperature)` to reuse. None: full logits
        every step.
      hidden_weight, hidden_layers: weight of the hidden-state MSE and its
        ``(student_layer, teacher_layer)`` pairs (negative indices count from the end; default the last).
      masks: bool pytree shaped like `student` (e.g. `jp.wanda`): masked weights start and stay zero.
      lora_rank, lora_alpha, lora_targets: train LoRA adapters of this rank instead of the weights.
      lr, warmup, weight_decay: the default optimiser's (`default_optimizer`, `lr_schedule`; lr 1e-4,
        or 1e-3 with LoRA; warmup steps / 10, at most 100); `optimizer` (with its own rate) replaces it.
      eval_calib, eval_every: held-out windows and how often to evaluate them (default steps / 10).
      checkpoint_dir, checkpoint_every: orbax checkpoints (default every steps / 10); an existing
        run there is resumed (it must come from the same arguments).
      log_every, callback, show_progress: ``callback(record)`` for each record; progress bar.

    Returns:
      `DistillResult(params, history, adapters, resumed_from)`. `history` holds one record per
      logged step s (every `log_every` steps and the last), evaluated step, or the end:
      ``{"step": s, "loss", "kl", ["hidden"], "lr", ["eval_ppl", "eval_kl"]}`` — the training loss
      of step s's batch and the held-out metrics of the weights after s updates (the record of
      step `steps` has only the held-out metrics). `lr` is None with a custom optimizer.
    """
    _check_models(student, teacher)
    steps, batch_size = check_int("steps", steps), check_int("batch_size", batch_size)
    key_data = _key_data(key)
    calib = _windows(student, teacher, calib, "calib")
    n = calib.shape[0]
    temperature = _number("temperature", temperature)
    hidden_weight = _number("hidden_weight", hidden_weight, strict=False)
    pairs = _hidden_pairs(student, teacher, hidden_layers, hidden_weight)
    top_k = _top_k_setting(teacher_top_k, calib, student.config.vocab_size, temperature)
    log_every = check_int("log_every", log_every)
    if masks is not None:
        if isinstance(masks, dict):
            masks = Params(student.config, masks)
        check_masks_like(student, masks)
        student = apply_masks(student, masks)
    lora = lora_rank is not None
    if lora:
        lora_rank = check_int("lora_rank", lora_rank)
        lora_alpha = _number("lora_alpha", lora_alpha)
    if eval_calib is not None:
        eval_calib = _windows(student, teacher, eval_calib, "eval_calib")
    eval_every = check_int("eval_every", eval_every) if eval_every is not None else max(1, steps // 10)
    checkpoint_every = (check_int("checkpoint_every", checkpoint_every) if checkpoint_every is not None
                        else max(1, steps // 10))
    if optimizer is None:
        lr = _number("lr", lr if lr is not None else (1e-3 if lora else 1e-4))
        warmup = check_int("warmup", warmup, low=0) if warmup is not None else max(1, min(100, steps // 10))
        weight_decay = _number("weight_decay", weight_decay, strict=False)
        optimizer = default_optimizer(weight_decay)
        schedule = lr_schedule(lr, steps, warmup)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise InvalidArgumentError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    else:
        schedule = None

    data_key, init_key = jax.random.split(key)
    if lora:
        trainable, base = lora_init(student, init_key, lora_rank, lora_targets), student.tree
    else:
        trainable, base = student.tree, None
    opt_state = optimizer.init(trainable)
    mask_tree = None if masks is None else masks.tree
    settings = _Settings(temperature, tuple(p[0] for p in pairs), hidden_weight, lora_alpha if lora else None)
    teacher_layers = tuple(p[1] for p in pairs)
    fingerprint = json.loads(json.dumps({
        "steps": steps, "batch_size": batch_size, "temperature": temperature, "hidden_weight": hidden_weight,
        "hidden_layers": [list(p) for p in pairs], "lora_rank": lora_rank, "lora_alpha": lora_alpha if lora else None,
        "teacher_top_k": top_k if top_k is None or isinstance(top_k, int) else int(np.shape(top_k.log_probs)[2]),
        "optimizer": "custom" if schedule is None else "default", "lr": lr if schedule is not None else None,
        "warmup": warmup if schedule is not None else None,
        "weight_decay": weight_decay if schedule is not None else None,
        "key": key_data, "calib": [*calib.shape, zlib.crc32(calib.tobytes())], "masked": masks is not None,
        "eval": None if eval_calib is None else [*eval_calib.shape, zlib.crc32(eval_calib.tobytes()), eval_every],
        "log_every": log_every}))

    def current() -> Params:
        return _student(trainable, base, mask_tree, student.config, settings.lora_alpha)

    history, start, resumed = [], 0, None
    manager = train_state.open_manager(checkpoint_dir) if checkpoint_dir is not None else None
    try:
        if manager is not None:
            got = train_state.restore_latest(manager, {"trainable": trainable, "opt_state": opt_state})
            if got is not None:
                start, state, meta = got
                _check_same_run(checkpoint_dir, meta.get("settings"), fingerprint)
                trainable, opt_state, history, resumed = state["trainable"], state["opt_state"], meta["history"], start
        if isinstance(top_k, int):
            top_k = teacher_lib.teacher_top_k(teacher, calib, top_k, temperature=temperature, batch_size=batch_size,
                                                  show_progress=show_progress)

        def checkpoint(s):
            if manager is not None and s > start and (s % checkpoint_every == 0 or s == steps):
                train_state.save_state(manager, s, current(), {"trainable": trainable, "opt_state": opt_state},
                                       {"step": s, "history": history, "settings": fingerprint}, masks=masks)

        def evaluate(s, rec):        # the held-out metrics of the weights after s updates
            if eval_calib is not None and (s % eval_every == 0 or s == steps):
                rec.update(held_out(current(), teacher, eval_calib, batch_size))

        def emit(rec):
            if len(rec) > 1:
                history.append(rec)
                if callback is not None:
                    callback(rec)

        for s in progress(range(start, steps), "distill", total=steps - start, enabled=show_progress):
            checkpoint(s)
            rec = {"step": s}
            evaluate(s, rec)
            idx = batch_indices(data_key, s, n, batch_size)
            batch = jnp.asarray(calib[idx])
            if top_k is None:
                targets = teacher_targets(teacher, batch, teacher_layers)
            else:
                targets = {"log_probs": jnp.asarray(top_k.log_probs[idx]), "indices": jnp.asarray(top_k.indices[idx]),
                           "log_rest": jnp.asarray(top_k.log_rest[idx])}
                if teacher_layers:
                    targets.update(teacher_targets(teacher, batch, teacher_layers, with_logits=False))
            lr_s = None if schedule is None else np.float32(schedule(s))
            trainable, opt_state, parts = _distill_step(trainable, opt_state, base, mask_tree, batch, targets, lr_s,
                                                        optimizer=optimizer, config=student.config, settings=settings)
            if s % log_every == 0 or s == steps - 1:
                rec.update({k: float(v) for k, v in parts.items()})
                rec["lr"] = None if schedule is None else schedule(s)
            emit(rec)
        checkpoint(steps)
        rec = {"step": steps}
        evaluate(steps, rec)
        emit(rec)
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return DistillResult(current(), history, trainable if lora else None, resumed)


def _check_same_run(directory, saved: dict | None, now: dict) -> None:
    if saved == now:
        return
    saved = saved or {}
    diff = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    raise CheckpointError(f"{directory} holds checkpoints of a run with other settings ({'; '.join(diff)}): "
                          f"resume with the same arguments, or use another checkpoint_dir")
