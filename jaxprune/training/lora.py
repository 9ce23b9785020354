"""LoRA recovery fine-tuning of a pruned model (Hu et al. 2022), mask-preserving.

Each adapted kernel W [in, out] gets ``A [in, r]`` and ``B [r, out]`` with B = 0
at the start, and the model trains as ``W' = W + (alpha / r) * (A @ B) * M``
(`lora_merge`) with W and the mask M fixed. The trained model and the merged
one are the same function, so merging is exact, and wherever M is False the
merged weight keeps its pruned value (zero): unstructured and N:M sparsity
survive recovery. Compacted (structurally pruned) models need no mask.

Adapters are a flat dict ``{"layers/0/self_attn/q_proj": {"a": .., "b": ..}}``:
plain data for optax, orbax, or `jax.tree.map`.

Example:
    >>> import jax, jax.numpy as jnp, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> calib = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    >>> masks = jp.magnitude(params, sparsity=0.5)
    >>> pruned = jp.apply_masks(params, masks)
    >>> res = lora_finetune(pruned, calib, masks=masks, rank=4, steps=5, batch_size=2, key=jax.random.key(0),
    ...                     show_progress=False)
    >>> merged = lora_merge(pruned, res.adapters, masks)
    >>> k = merged["layers"][0]["mlp"]["up_proj"]["kernel"]
    >>> bool((k[~masks["layers"][0]["mlp"]["up_proj"]["kernel"]] == 0).all())
    True
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core.checks import check_tokens
from jaxprune.errors import InvalidArgumentError
from jaxprune.core.params import Params, get_path
from jaxprune.core.progress import progress
from jaxprune.oneshot.pruning import default_prunable, kernel_paths
from jaxprune.training.masked import lm_loss, random_batch

__all__ = ["LoRAResult", "lora_finetune", "lora_init", "lora_merge"]


class LoRAResult(NamedTuple):
    adapters: dict
    history: list      # per logged step: step, loss


def _kernels(params: Params, targets) -> dict:
    out = {"/".join(map(str, path[:-1])): get_path(params.tree, path)
           for path in kernel_paths(params, targets) if path[-1] == "kernel"}
    if not out:
        raise InvalidArgumentError("no kernel matches the LoRA targets")
    return out


def lora_init(params: Params, key, rank: int = 8, targets=default_prunable) -> dict:
    """Adapters for every 2-D kernel whose path satisfies `targets` (default: the transformer
    blocks' linears): A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, float32."""
    if int(rank) < 1:
        raise InvalidArgumentError(f"rank must be a positive integer, got {rank!r}")
    kernels = _kernels(params, targets)
    keys = jax.random.split(key, len(kernels))
    out = {}
    for k, (name, w) in zip(keys, sorted(kernels.items())):
        fan_in, fan_out = w.shape
        if rank > min(fan_in, fan_out):
            raise InvalidArgumentError(f"rank {rank} exceeds the smaller side of {name} {list(w.shape)}")
        bound = 1.0 / np.sqrt(fan_in)
        out[name] = {"a": jax.random.uniform(k, (fan_in, rank), jnp.float32, -bound, bound),
                     "b": jnp.zeros((rank, fan_out), jnp.float32)}
    return out


def _node(tree: dict, name: str) -> dict:
    for p in name.split("/"):
        tree = tree[int(p)] if isinstance(tree, list) else tree[p]
    return tree


def _mask_of(masks, name: str):
    if masks is None:
        return None
    tree = masks.tree if isinstance(masks, Params) else masks
    return _node(tree, name)["kernel"]


def lora_merge(params: Params, adapters: dict, masks=None, alpha: float = 16.0) -> Params:
    """``W + (alpha / rank) * A @ B``, the update applied only where `masks` keeps a weight
    (pure, differentiable in the adapters; this is also the training forward's weights)."""
    tree = jax.tree.map(lambda x: x, params.tree)         # fresh containers, shared leaves
    for name, ab in adapters.items():
        node = _node(tree, name)
        w = node["kernel"]
        if ab["a"].shape[0] != w.shape[0] or ab["b"].shape[1] != w.shape[1]:
            raise InvalidArgumentError(f"adapter {name} is {ab['a'].shape[0]}x{ab['b'].shape[1]}, "
                                       f"the kernel {list(w.shape)}")
        rank = ab["a"].shape[1]
        delta = (alpha / rank) * (ab["a"] @ ab["b"])
        m = _mask_of(masks, name)
        new = w.astype(jnp.float32) + (delta if m is None else jnp.where(m, delta, 0.0))
        node["kernel"] = new.astype(w.dtype)
    return Params(params.config, tree)


_DEFAULT_OPTIMIZER = optax.adam(1e-3)   # one value (not rebuilt per call), so its step compiles once


@partial(jax.jit, static_argnames=("optimizer", "alpha"))
def _lora_step(adapters, opt_state, batch, params, masks, optimizer, alpha):
    """One LoRA step (compiled once per optimizer, alpha and shapes)."""
    loss, grads = jax.value_and_grad(lambda a: lm_loss(lora_merge(params, a, masks, alpha), batch))(adapters)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss


def lora_finetune(params: Params, calib, masks=None, *, rank: int = 8, alpha: float = 16.0,
                  steps: int = 100, batch_size: int = 4, optimizer: optax.GradientTransformation | None = None,
                  targets=default_prunable, key=None, log_every: int = 10, show_progress: bool | None = None,
                  callback=None) -> LoRAResult:
    """Train LoRA adapters on `calib` (int windows [N, T]) with the LM loss, base weights and mask fixed.

    `optimizer` defaults to ``optax.adam(1e-3)``; each step draws `batch_size` windows with `key`
    (required: no default seed); ``callback(record)`` every `log_every` steps.
    Returns a `LoRAResult`; ``lora_merge(params, result.adapters, masks, alpha)`` is the recovered model.
    """
    windows = jnp.asarray(check_tokens(params.config, calib, what="calib", error=InvalidArgumentError,
                                       check_context=False))
    if int(steps) < 1 or int(batch_size) < 1:
        raise InvalidArgumentError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    if key is None:
        raise InvalidArgumentError("lora_finetune initialises adapters and draws batches: pass key=jax.random.key(seed)")
    key, init_key = jax.random.split(key)
    adapters = lora_init(params, init_key, rank, targets)
    optimizer = optimizer or _DEFAULT_OPTIMIZER
    opt_state = optimizer.init(adapters)

    history = []
    for step in progress(range(int(steps)), "LoRA", total=int(steps), enabled=show_progress):
        key, kb = jax.random.split(key)
        adapters, opt_state, loss = _lora_step(adapters, opt_state, random_batch(kb, windows, batch_size),
                                               params, masks, optimizer=optimizer, alpha=alpha)
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": float(loss)})
            if callback is not None:
                callback(history[-1])
    return LoRAResult(adapters, history)
