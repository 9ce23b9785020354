"""Loading HF directories written by transformers, and every bad input named in the docs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import jaxprune as jp

from conftest import tiny_llama, tiny_opt, torch_logits


def tokens(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, 13)).astype(np.int32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = tiny_llama(tie_word_embeddings=False)
    d = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(d)
    return d, model


@pytest.mark.parametrize("kind", ["llama-tied", "llama-sharded", "opt", "opt-post-ln"])
def test_round_trip_from_save_pretrained(tmp_path, kind):
    if kind.startswith("llama"):
        model = tiny_llama(tie_word_embeddings=True, num_hidden_layers=3)
    else:
        model = tiny_opt(do_layer_norm_before=(kind == "opt"))
    d = str(tmp_path / "ckpt")
    model.save_pretrained(d, max_shard_size="40KB" if kind == "llama-sharded" else "5GB")
    if kind == "llama-sharded":
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    params = jp.load(d)
    x = tokens(params.config.vocab_size)
    np.testing.assert_allclose(np.asarray(jp.forward(params, x)), torch_logits(model, x), atol=1e-4, rtol=0)


def test_load_keeps_stored_dtype_when_asked(llama_dir):
    params = jp.load(llama_dir[0], dtype=None)
    assert params["layers"][0]["mlp"]["up_proj"]["kernel"].dtype == np.float32


def test_missing_path_is_named():
    with pytest.raises(jp.CheckpointError, match="does not exist.*smollm2-135m"):
        jp.load("/no/such/checkpoint")


def test_hub_id_without_network_fails_fast_and_clearly():
    with pytest.raises(jp.CheckpointError, match="could not be downloaded"):
        jp.load("no-such-owner-jaxprune/no-such-model")


def copy_with_config(src, dst, **changes):
    """A copy of checkpoint `src` at `dst` with `changes` written into its config.json."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_architecture(tmp_path, llama_dir):
    d = copy_with_config(llama_dir[0], tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(jp.UnsupportedModelError, match="model_type 'gpt2'"):
        jp.load(str(d))


def test_config_that_does_not_match_the_weights(tmp_path, llama_dir):
    d = copy_with_config(llama_dir[0], tmp_path / "mismatch", intermediate_size=128)
    with pytest.raises(jp.CheckpointError, match=r"do not match the config.*up_proj.*\(64, 96\).*\(64, 128\)"):
        jp.load(str(d))


def test_missing_layer_weights_are_listed(tmp_path, llama_dir):
    d = copy_with_config(llama_dir[0], tmp_path / "layers", num_hidden_layers=3)
    with pytest.raises(jp.CheckpointError, match=r"missing \['layers'\]\[2\]"):
        jp.load(str(d))


def test_truncated_safetensors(tmp_path, llama_dir):
    d = tmp_path / "trunc"
    shutil.copytree(llama_dir[0], d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(jp.CheckpointError, match="truncated"):
        jp.load(str(d))


def test_corrupt_safetensors_header(tmp_path, llama_dir):
    d = tmp_path / "corrupt"
    shutil.copytree(llama_dir[0], d)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(jp.CheckpointError, match="corrupt"):
        jp.load(str(d))


def test_directory_without_config(tmp_path):
    with pytest.raises(jp.CheckpointError, match="no config.json"):
        jp.load(str(tmp_path))


def test_directory_without_weights(tmp_path, llama_dir):
    shutil.copy(os.path.join(llama_dir[0], "config.json"), tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(jp.CheckpointError, match="no model.safetensors.*pytorch_model.bin"):
        jp.load(str(tmp_path))


def test_corrupt_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(jp.CheckpointError, match="not a (readable )?GGUF"):
        jp.load(str(bad))
    from jaxprune.io.resolve import resolve
    try:
        real = resolve("smollm2-135m")
    except jp.CheckpointError:
        pytest.skip("SmolLM2 weights not installed")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(jp.CheckpointError, match=str(cut)):
        jp.load(str(cut))


def test_tokenizer_from_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = jp.tokenizer(str(tmp_path))
    assert tok.encode("hello world") == [1, 2]
    with pytest.raises(jp.CheckpointError, match="no tokenizer.json"):
        jp.tokenizer(str(tmp_path / ".."))
