"""GGUF export round trips on tiny random Llama models (no llama.cpp needed).

`jp.load` of our own GGUF must equal the params exactly (float32) for a dense, a uniformly
compacted and a non-uniformly compacted model (an attention-free layer 0, an FFN-free layer
with unequal K/V groups, an attention-free layer, fewer heads and FFN channels); float16 and
bfloat16 must equal the params rounded by numpy / ml_dtypes. The file itself is read with the
`gguf` package's reader and checked against the facts llama.cpp relies on (architecture,
per-layer arrays, placeholders, Q/K permutation, tensor types), and the tokenizer metadata
against the `tokenizers` backend it came from.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.data.tokenization import Tokenizer
from jaxprune.errors import CheckpointError, InvalidArgumentError, UnsupportedModelError

gguf = pytest.importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.lru_cache(maxsize=None)
def tiny_bpe(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained on a bundled novel, with three special tokens (ids 0-2)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([jp.bundled_text("emma")[:200_000]], trainer)
    backend.add_tokens(["Mr. Knightley"])  # a non-special added token
    return Tokenizer(backend, bos_token_id=1, eos_token_id=2, source="trained")


def tiny_params(vocab=301, layers=5, seed=0, **kw):
    cfg = jp.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-6, **kw)
    params = jp.init(cfg, jax.random.key(seed))
    # norms away from 1, so that a dropped or misplaced norm shows
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype) if "scale" in jax.tree_util.keystr(p) else x,
        params)


def non_uniform(params):
    """Layer 0 attention-free; 1 FFN-free with unequal K/V groups (2, 1); 2 attention-free with fewer
    FFN channels; 3 one head per group and fewer channels; 4 dense."""
    L, H, F = params.config.num_hidden_layers, 4, params.config.intermediate_size
    heads = np.ones((L, H), np.float32)
    heads[1, 3] = 0
    heads[3, [1, 3]] = 0
    ffn = np.ones((L, F), np.float32)
    ffn[2, :20] = 0
    ffn[3, 5:11] = 0
    ffn[0, ::3] = 0
    attn = np.ones(L, np.float32)
    attn[[0, 2]] = 0
    mlp = np.ones(L, np.float32)
    mlp[1] = 0
    return jp.compact(params, {"heads": jnp.asarray(heads), "ffn": jnp.asarray(ffn),
                               "attn": jnp.asarray(attn), "mlp": jnp.asarray(mlp)})


def uniform(params):
    F = params.config.intermediate_size
    ffn = np.ones((params.config.num_hidden_layers, F), np.float32)
    ffn[:, ::4] = 0
    return jp.compact(params, {"ffn": jnp.asarray(ffn)})


def narrower(params):
    """8 of 32 hidden dims removed: hidden 24 with 4 heads of head_dim 8 (24 / 4 = 6 would be wrong)."""
    keep = np.ones(params.config.hidden_size, np.float32)
    keep[3::4] = 0
    return jp.compact(params, {"hidden": jnp.asarray(keep)})


@pytest.fixture(scope="module")
def models():
    dense = tiny_params()
    small = non_uniform(dense)
    shapes = [dict(d) for d in small.config.layer_shapes]
    assert [d["n_heads"] for d in shapes] == [0, 3, 0, 2, 4]
    assert [d["ffn_dim"] for d in shapes] == [32, 0, 28, 42, 48]
    assert tuple(shapes[1]["kv_groups"]) == (2, 1)
    uni = uniform(dense)
    assert uni.config.layer_shapes is None and uni.config.intermediate_size == 36
    hid = narrower(dense)
    assert hid.config.hidden_size == 24 and hid.config.head_dim == 8
    return {"dense": dense, "uniform": uni, "non-uniform": small, "hidden": hid}


def flat(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same(a, b, round_to=None):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        want = fa[k].astype(np.float32)
        if round_to is not None and want.ndim == 2:  # 1-D tensors stay float32
            want = want.astype(round_to).astype(np.float32)
        assert fb[k].dtype == np.float32 and fb[k].shape == want.shape, k
        np.testing.assert_array_equal(fb[k], want, err_msg=k)


def fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items()}


def copy_gguf(src, dst, keys=None, tensors=None) -> str:
    """Rewrite GGUF `src` as `dst` with the gguf package, as another tool would: `keys` maps a key to
    its new value (None: dropped), `tensors(name, array)` returns the new array (None: dropped)."""
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = (keys or {}).get(key, fld.contents())
        if value is not None:
            sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, fld.types[0], sub)
    for x in reader.tensors:
        a = np.array(x.data).reshape(tuple(int(d) for d in reversed(x.shape)))
        a = tensors(x.name, a) if tensors else a
        if a is not None:
            w.add_tensor(x.name, a)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(dst)


@pytest.mark.parametrize("kind", ["dense", "uniform", "non-uniform", "hidden"])
def test_float32_round_trip_is_exact(models, kind, tmp_path):
    params = models[kind]
    path = jp.save(params, str(tmp_path / "m.gguf"))
    back = jp.load(path)
    assert back.config == params.config
    assert_same(params, back)
    tokens = np.random.default_rng(0).integers(0, 301, (1, 12)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(jp.forward(back, tokens)), np.asarray(jp.forward(params, tokens)))


@pytest.mark.parametrize("dtype,numpy_dtype,ggml", [("float16", np.float16, "F16"),
                                                    ("bfloat16", ml_dtypes.bfloat16, "BF16")])
@pytest.mark.parametrize("kind", ["dense", "non-uniform"])
def test_half_precision_equals_numpy_rounding(models, kind, dtype, numpy_dtype, ggml, tmp_path):
    params = models[kind]
    path = jp.save(params, str(tmp_path / "m.gguf"), dtype=dtype)
    back = jp.load(path)
    assert back.config == params.config
    assert_same(params, back, round_to=numpy_dtype)
    reader, _ = fields(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    assert types["token_embd.weight"] == types["blk.4.attn_q.weight"] == types["blk.4.ffn_down.weight"] == ggml


def test_explicit_format_and_params_dtype(models, tmp_path):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), models["dense"])
    path = jp.save(params, str(tmp_path / "model.bin"), format="gguf")  # no .gguf suffix
    reader, _ = fields(path)
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"BF16"}  # the params' dtype
    d = jp.save(models["dense"], str(tmp_path / "dir.gguf"), format="hf")
    assert (tmp_path / "dir.gguf" / "config.json").is_file() and d.endswith("dir.gguf")


def permute_like_llama_cpp(w, n_head):
    """convert_hf_to_gguf.py's Q/K permutation, written independently: within each head the rotate-half
    rows (first half, second half) become interleaved pairs (x0, x_{d/2}, x1, x_{d/2+1}, ...)."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(d // 2):
            out[h * d + 2 * j] = w[h * d + j]
            out[h * d + 2 * j + 1] = w[h * d + d // 2 + j]
    return out


def test_head_size_is_written_explicitly(models, tmp_path):
    _, f = fields(jp.save(models["hidden"], str(tmp_path / "m.gguf")))
    assert (f["llama.embedding_length"], f["llama.attention.head_count"]) == (24, 4)
    assert [f[f"llama.{k}"] for k in ("attention.key_length", "attention.value_length", "rope.dimension_count")] \
        == [8, 8, 8]


def test_deci_file_holds_what_llama_cpp_needs(models, tmp_path):
    params = models["non-uniform"]
    reader, f = fields(jp.save(params, str(tmp_path / "m.gguf")))
    assert f["general.architecture"] == "deci"
    # layer 0: a zero 1-head attention placeholder (llama.cpp takes the head size from layer 0);
    # layer 1: K/V repeated per query head (groups 2, 1) and a zero width-1 FFN (n_ff=0 would drop
    # its attention)
    assert f["deci.attention.head_count"] == [1, 3, 0, 2, 4]
    assert f["deci.attention.head_count_kv"] == [1, 3, 0, 2, 2]
    assert f["deci.feed_forward_length"] == [32, 1, 28, 42, 48]
    assert [f[f"deci.{k}"] for k in ("attention.key_length", "attention.value_length", "rope.dimension_count")] \
        == [8, 8, 8]
    t = {x.name: np.asarray(x.data).reshape(tuple(int(d) for d in reversed(x.shape))) for x in reader.tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                 "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"):
        assert not t[name].any(), name
    assert t["blk.0.attn_q.weight"].shape == (8, 32) and t["blk.1.ffn_down.weight"].shape == (32, 1)
    assert not any(n.startswith("blk.2.attn") for n in t)
    lp = params["layers"][1]["self_attn"]
    k = np.asarray(lp["k_proj"]["kernel"]).T  # [2 groups * 8, 32]
    expanded = np.concatenate([k[:8], k[:8], k[8:]])
    np.testing.assert_array_equal(t["blk.1.attn_k.weight"], permute_like_llama_cpp(expanded, 3))
    np.testing.assert_array_equal(t["blk.1.attn_q.weight"],
                                  permute_like_llama_cpp(np.asarray(lp["q_proj"]["kernel"]).T, 3))
    v = np.asarray(lp["v_proj"]["kernel"]).T
    np.testing.assert_array_equal(t["blk.1.attn_v.weight"], np.concatenate([v[:8], v[:8], v[8:]]))
    assert json.loads(f["jaxprune.config"])["jaxprune_layer_shapes"][1]["kv_groups"] == [2, 1]


def test_dense_file_is_llama_with_llama_cpp_names(models, tmp_path):
    params = models["dense"]
    reader, f = fields(jp.save(params, str(tmp_path / "m.gguf")))
    assert f["general.architecture"] == "llama"
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.feed_forward_length"],
            f["llama.block_count"], f["llama.embedding_length"]) == (4, 2, 48, 5, 32)
    names = {x.name for x in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.4.attn_norm.weight",
            "blk.4.ffn_norm.weight", "blk.0.ffn_gate.weight"} <= names and len(names) == 3 + 9 * 5
    t = {x.name: np.asarray(x.data).reshape(tuple(int(d) for d in reversed(x.shape))) for x in reader.tensors}
    k = np.asarray(params["layers"][2]["self_attn"]["k_proj"]["kernel"]).T
    np.testing.assert_array_equal(t["blk.2.attn_k.weight"], permute_like_llama_cpp(k, 2))
    np.testing.assert_array_equal(t["output.weight"], np.asarray(params["lm_head"]["kernel"]).T)


def test_file_without_our_key_loads_as_it_says(models, tmp_path):
    """A deci file from another tool (our file minus the jaxprune.config key) loads with the widths it
    states: the placeholders become real (zero) sublayers, expanded K/V stay expanded; same logits."""
    params = models["non-uniform"]
    copy_gguf(jp.save(params, str(tmp_path / "ours.gguf")), tmp_path / "theirs.gguf", keys={"jaxprune.config": None})
    back = jp.load(str(tmp_path / "theirs.gguf"))
    shapes = [dict(d) for d in back.config.layer_shapes]
    assert [(d["n_heads"], d["n_kv"], d["ffn_dim"]) for d in shapes] == [(1, 1, 32), (3, 3, 1), (0, 0, 28),
                                                                          (2, 2, 42), (4, 2, 48)]
    assert np.float32(back.config.rms_norm_eps) == np.float32(1e-6)
    tokens = np.random.default_rng(1).integers(0, 301, (1, 12)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(jp.forward(back, tokens)), np.asarray(jp.forward(params, tokens)),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 1.1},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}])
def test_rope_scaling_round_trip(rope, tmp_path):
    from jaxprune.models.config import freeze
    params = tiny_params(layers=2, rope_scaling=freeze(rope), rope_theta=500.0)
    path = jp.save(params, str(tmp_path / "m.gguf"))
    back = jp.load(path)
    assert back.config == params.config and back.config.rope == rope
    reader, f = fields(path)
    if rope["rope_type"] == "linear":
        assert f["llama.rope.scaling.type"] == "linear"
        assert np.float32(f["llama.rope.scaling.factor"]) == np.float32(1.1)
    else:  # llama.cpp divides pair i's frequency by rope_freqs[i]: HF's llama3 rule, in numpy
        inv = 1.0 / 500.0 ** (np.arange(0, 8, 2) / 8)
        wavelen = 2 * np.pi / inv
        ref = []
        for w in wavelen:
            if w < 32 / 4:
                ref.append(1.0)
            elif w > 32 / 1:
                ref.append(8.0)
            else:
                s = (32 / w - 1) / (4 - 1)
                ref.append(1 / ((1 - s) / 8 + s))
        freqs = next(np.asarray(x.data) for x in reader.tensors if x.name == "rope_freqs.weight")
        np.testing.assert_allclose(freqs, ref, rtol=1e-6)
    tokens = np.arange(40, dtype=np.int32)[None] % 301
    np.testing.assert_array_equal(np.asarray(jp.forward(back, tokens)), np.asarray(jp.forward(params, tokens)))


def test_tokenizer_metadata_from_the_backend(models, tmp_path):
    tok = tiny_bpe()
    assert tok.vocab_size == 301
    _, f = fields(jp.save(models["dense"], str(tmp_path / "m.gguf"), tokenizer=tok))
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "default"
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    types = f["tokenizer.ggml.token_type"]
    assert types[:3] == [3, 3, 3] and types[vocab["Mr. Knightley"]] == 4 and set(types[3:300]) == {1}
    spec = json.loads(tok.backend.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    # the metadata is a working BPE: jaxprune's GGUF tokenizer encodes like the backend
    text = jp.bundled_text("prideprejudice")[1000:3000] + " <|im_start|> naïve £5"
    back = jp.tokenizer(str(tmp_path / "m.gguf"))
    assert back.encode(text) == tok.encode(text) and back.decode(tok.encode(text)) == text


def test_tokenizer_from_a_gguf_is_copied_and_padded(tmp_path):
    tok = tiny_bpe()
    first = jp.save(tiny_params(layers=1), str(tmp_path / "a.gguf"), tokenizer=tok)
    from_gguf = jp.tokenizer(first)
    assert from_gguf.source == first
    second = jp.save(tiny_params(vocab=320, layers=1), str(tmp_path / "b.gguf"), tokenizer=from_gguf)
    _, a = fields(first)
    _, b = fields(second)
    keys = sorted(k for k in a if k.startswith("tokenizer.ggml."))
    assert keys == sorted(k for k in b if k.startswith("tokenizer.ggml."))
    for k in keys:
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            assert b[k][:301] == a[k] and len(b[k]) == 320, k
        else:
            assert b[k] == a[k], k
    assert b["tokenizer.ggml.tokens"][301] == "[PAD301]" and set(b["tokenizer.ggml.token_type"][301:]) == {5}


def test_overwrite_replaces_atomically(models, tmp_path):
    path = tmp_path / "m.gguf"
    jp.save(models["dense"], str(path))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        jp.save(models["uniform"], str(path))
    assert path.read_bytes() == before
    jp.save(models["uniform"], str(path), overwrite=True)
    assert jp.load(str(path)).config == models["uniform"].config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left
    with pytest.raises(UnsupportedModelError, match="byte-level BPE"):  # rejected before anything is written
        jp.save(models["dense"], str(tmp_path / "n.gguf"), tokenizer=Tokenizer(word_level(), source="w"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def word_level():
    from tokenizers import Tokenizer as Backend, models
    return Backend(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))


def test_bad_inputs(models, tmp_path):
    opt = jp.init(jp.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=32), jax.random.key(0))
    with pytest.raises(UnsupportedModelError, match="arch 'opt'"):
        jp.save(opt, str(tmp_path / "o.gguf"))
    with pytest.raises(InvalidArgumentError, match="GGUF dtype must be one of"):
        jp.save(models["dense"], str(tmp_path / "x.gguf"), dtype="int8")
    with pytest.raises(InvalidArgumentError, match="format must be one of"):
        jp.save(models["dense"], str(tmp_path / "x"), format="onnx")
    with pytest.raises(InvalidArgumentError, match="more than the model's vocab_size=64"):
        jp.save(tiny_params(vocab=64, layers=1), str(tmp_path / "x.gguf"), tokenizer=tiny_bpe())
    with pytest.raises(InvalidArgumentError, match="holds no masks"):
        jp.save(models["dense"], str(tmp_path / "x.gguf"),
                masks=jax.tree.map(lambda x: np.ones(x.shape, bool), models["dense"]))
    head = models["dense"]["lm_head"]["kernel"].at[0, 0].set(1e5)
    big = models["dense"].replace({**models["dense"].tree, "lm_head": {"kernel": head}})
    with pytest.raises(InvalidArgumentError, match="output.weight holds values beyond float16's range"):
        jp.save(big, str(tmp_path / "x.gguf"), dtype="float16")
    with pytest.raises(CheckpointError, match="is a directory"):
        jp.save(models["dense"], str(tmp_path), format="gguf", overwrite=True)
    assert not list(tmp_path.iterdir())


def test_tampered_files_are_rejected(models, tmp_path):
    """Our key must agree with the file's own metadata, and placeholders must still be zeros."""
    ours = jp.save(models["non-uniform"], str(tmp_path / "ours.gguf"))
    with pytest.raises(CheckpointError, match="disagrees with the file's own metadata.*rms_norm_eps"):
        jp.load(copy_gguf(ours, tmp_path / "eps.gguf", keys={"deci.attention.layer_norm_rms_epsilon": 1e-3}))
    with pytest.raises(CheckpointError, match="placeholder"):
        jp.load(copy_gguf(ours, tmp_path / "ph.gguf",
                          tensors=lambda n, a: a + 1 if n == "blk.1.ffn_up.weight" else a))
    with pytest.raises(CheckpointError, match="differ within a group"):
        jp.load(copy_gguf(ours, tmp_path / "kv.gguf", tensors=lambda n, a: a * np.arange(
            a.shape[0], dtype=np.float32)[:, None] if n == "blk.1.attn_v.weight" else a))
