"""Helpers shared by tests/test_harness.py, tests/test_tasks.py and tests/test_generation_metrics.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune as jp

VOCAB = 259


class ByteTok:
    """Byte-level toy tokenizer: id = byte + 3; 0 is padding, 1 BOS, 2 EOS."""

    bos_token_id, eos_token_id = 1, 2
    source = "bytes"

    def encode(self, s: str) -> list[int]:
        return [b + 3 for b in s.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", "replace")


def tiny_params(seed: int = 0, **kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, max_position_embeddings=256)
    cfg.update(kw)
    return jp.init(jp.LlamaConfig(**cfg), jax.random.key(seed))


def successor_params(successor: dict[str, str], seed: int = 0):
    """A Llama whose greedy next token after character c is successor[c] (other tokens: arbitrary).

    Attention and MLP outputs are zeroed, so the last hidden state is the token's
    embedding; the LM head scores token y by the embedding of the characters whose
    successor is y (random 64-d embeddings are nearly orthogonal).
    """
    p = tiny_params(seed, hidden_size=64)
    tree = jax.tree.map(lambda x: x, p.tree)
    for layer in tree["layers"]:
        layer["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(layer["self_attn"]["o_proj"]["kernel"])
        layer["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(layer["mlp"]["down_proj"]["kernel"])
    emb = np.asarray(tree["embed_tokens"]["embedding"], np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    head = np.zeros((emb.shape[1], VOCAB), np.float32)
    for a, b in successor.items():
        head[:, b.encode()[0] + 3] += 4.0 * emb[a.encode()[0] + 3]
    tree["lm_head"]["kernel"] = jnp.asarray(head)
    return p.replace(tree=tree)


def np_scores(params, ids, gates=None) -> tuple[np.ndarray, np.ndarray]:
    """log p(ids[t+1] | ids[:t+1]) and whether ids[t+1] is the argmax, from one unpadded forward (float64)."""
    logits = np.asarray(jp.forward(params, jnp.asarray([ids], jnp.int32), gates), np.float64)[0, :-1]
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    tgt = np.asarray(ids[1:])
    return logp[np.arange(len(tgt)), tgt], logits.argmax(-1) == tgt

