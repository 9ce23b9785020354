"""Keep a pruning mask through your own optax training loop.

Prunes SmolLM2 with Wanda (50%), then fine-tunes all weights with AdamW and
weight decay in a plain jitted loop. `jaxprune.keep_masked(masks)`, chained
after the optimiser, keeps every pruned weight at exactly zero.

    python examples/masked_training.py [--steps 20] [--tiny]

``--tiny`` uses a small random model and random tokens (seconds, no weights needed).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp


def data(tiny: bool):
    if tiny:
        cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        params = jp.init(cfg, jax.random.key(0))
        tokens = np.asarray(jax.random.randint(jax.random.key(1), (40, 32), 0, 64), np.int32)
        return params, tokens[:8], tokens[8:32], tokens[32:]
    params, tok = jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m")
    texts = [jp.bundled_text(n) for n in jp.data.CALIBRATION_TEXTS]
    calib = jp.calibration_windows(tok, texts, n=32, seqlen=256, seed=0)
    train = jp.calibration_windows(tok, texts, n=256, seqlen=128, seed=1)
    held_out = jp.eval_windows(tok, jp.bundled_text(jp.data.EVALUATION_TEXT), seqlen=512, max_windows=16)
    return params, calib, train, held_out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()

    params, calib, train, held_out = data(args.tiny)
    masks = jp.wanda(params, calib, sparsity=0.5)
    params = jp.apply_masks(params, masks)
    print(f"pruned: perplexity {jp.perplexity(params, held_out):.2f}")

    # Any optax optimiser; keep_masked goes last so nothing after it can revive a pruned weight.
    tx = optax.chain(optax.adamw(args.lr, weight_decay=0.01), jp.keep_masked(masks))
    opt_state = tx.init(params)

    def loss_fn(p, batch):
        logits = jp.forward(p, batch[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))

    @jax.jit
    def train_step(p, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    rng = np.random.default_rng(0)
    for step in range(args.steps):
        batch = jnp.asarray(train[rng.choice(len(train), args.batch_size, replace=False)])
        params, opt_state, loss = train_step(params, opt_state, batch)
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {float(loss):.4f}")

    still_zero = all(bool(jnp.all(jnp.where(m, 0, x) == 0))
                     for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)))
    print(f"pruned weights still zero: {still_zero}")
    print(f"fine-tuned: perplexity {jp.perplexity(params, held_out):.2f}")
    print(f"sparsity of the pruned linears: {jp.sparsity_summary(masks)['pruned_sparsity']:.3f}")


if __name__ == "__main__":
    main()
