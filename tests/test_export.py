"""save(): HF directories that transformers and jaxprune load back, written atomically."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import jaxprune as jp

from conftest import tiny_llama, tiny_opt, torch_logits


def calib(vocab):
    return np.random.default_rng(0).integers(0, vocab, (4, 16)).astype(np.int32)


@pytest.mark.parametrize("kind", ["llama-gqa-wanda", "opt-sparsegpt-2:4"])
def test_pruned_model_round_trips_through_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    src = str(tmp_path / "src")
    (tiny_llama(num_key_value_heads=2) if kind.startswith("llama") else tiny_opt()).save_pretrained(src)
    params = jp.load(src)
    c = calib(params.config.vocab_size)
    if kind.startswith("llama"):
        masks = jp.wanda(params, c, 0.5)
        pruned = jp.apply_masks(params, masks)
    else:
        pruned, masks = jp.sparsegpt(params, c, 0.5, pattern="2:4", blocksize=32)
    out = jp.save(pruned, str(tmp_path / "out"), masks=masks, max_shard_bytes=60_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))  # sharded
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = c[:2]
    ours = np.asarray(jp.forward(pruned, x))
    np.testing.assert_allclose(torch_logits(model, x), ours, atol=1e-4, rtol=0)
    back = jp.load(out)
    np.testing.assert_allclose(np.asarray(jp.forward(back, x)), ours, atol=1e-6, rtol=0)
    # Masks beside the model, bit-packed (1 bit per weight), read back exactly.
    back_masks = jp.load_masks(out)
    for a, b in zip(jax.tree.leaves(back_masks), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, bool))
    mask_file = os.path.join(out, "masks.safetensors")
    pruned_entries = sum(np.size(m) for m in jax.tree.leaves(masks) if not np.all(m))
    assert os.path.getsize(mask_file) < pruned_entries / 8 + 4096


def test_masks_tree_must_match_the_params(tmp_path):
    cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    params = jp.init(cfg, jax.random.key(0))
    with pytest.raises(jp.InvalidArgumentError, match="shaped like params"):
        jp.save(params, str(tmp_path / "x"), masks={"layers": []})
    assert not os.listdir(tmp_path)


def test_save_never_overwrites_unless_asked(tmp_path):
    cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    params = jp.init(cfg, jax.random.key(0))
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(jp.CheckpointError, match="already exists"):
        jp.save(params, str(out))
    assert (out / "precious.txt").read_text() == "keep me"
    jp.save(params, str(out), overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_save_to_unwritable_place(tmp_path):
    cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(jp.CheckpointError, match="cannot write"):
        jp.save(jp.init(cfg, jax.random.key(0)), str(blocker / "sub" / "ckpt"))
