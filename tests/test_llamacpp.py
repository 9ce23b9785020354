"""llama.cpp (through llama-cpp-python, the `llamacpp` extra) runs our GGUF files like jaxprune.

The reference is llama.cpp itself: its logits for the same token ids (perplexity computed from
them in numpy) and its own greedy decoding. Models: tiny random Llamas (fast; every quirk of
the ``deci`` writer: attention-free layer 0, an FFN-free layer with attention, unequal K/V
groups, an attention-free layer), and SmolLM2-135M dense, uniformly FFN-compacted and
non-uniformly compacted (heads, FFN channels and whole sublayers removed).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]'; `make test` does)")

from test_gguf_export import copy_gguf, narrower, non_uniform, tiny_bpe, tiny_params  # noqa: E402

SEQLEN = 256


def runtime(path, n_ctx=512):
    """llama.cpp on 2 threads with a float32 KV cache (its default, float16, rounds K and V)."""
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def llama_cpp_logits(llm, tokens) -> np.ndarray:
    """llama.cpp's float32 logits [T, V] for one sequence of token ids (fresh KV cache)."""
    llm.reset()
    llm.eval([int(t) for t in tokens])
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def llama_cpp_perplexity(llm, windows) -> float:
    """exp(mean NLL) of every next-token prediction inside each window, from llama.cpp's logits."""
    nll = []
    for w in windows:
        z = llama_cpp_logits(llm, w)[:-1]
        m = z.max(axis=1, keepdims=True)
        logz = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        nll.append(logz - z[np.arange(len(w) - 1), w[1:]])
    return float(np.exp(np.concatenate(nll).mean()))


def llama_cpp_greedy(llm, prompt, n) -> list[int]:
    llm.reset()
    gen = llm.generate([int(t) for t in prompt], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    return list(itertools.islice(gen, n))


# ----------------------------------------------------------------------------- tiny models (fast)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = tiny_bpe()
    dense = tiny_params(seed=3)
    d = tmp_path_factory.mktemp("tiny_llamacpp")
    return {kind: (p, jp.save(p, str(d / f"{kind}.gguf"), tokenizer=tok))
            for kind, p in (("dense", dense), ("non-uniform", non_uniform(dense)), ("hidden", narrower(dense)))}


TOKENS = np.random.default_rng(0).integers(0, 301, 48)


def close(ours, ref):
    return np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("kind", ["dense", "non-uniform", "hidden"])
def test_tiny_logits_equal_llama_cpp(tiny, kind):
    """Dense; non-uniform (every deci workaround); hidden dims removed (head_dim 8 != 24 / 4 heads)."""
    params, path = tiny[kind]
    ours = np.asarray(jp.forward(params, jnp.asarray(TOKENS[None], jnp.int32)))[0]
    assert close(ours, llama_cpp_logits(runtime(path, n_ctx=64), TOKENS))


def test_llama_cpp_drops_the_attention_of_an_ffn_free_layer(tiny, tmp_path):
    """Why FFN-free layers get a zero FFN of width 1: written with feed_forward_length 0, llama.cpp
    skips layer 1 entirely (its attention too), i.e. computes the model with layer 1's attention
    gated off."""
    params, path = tiny["non-uniform"]
    ffn = list(gguf_field(path, "deci.feed_forward_length"))
    assert ffn[1] == 1
    bare = copy_gguf(path, tmp_path / "bare.gguf", keys={"deci.feed_forward_length": ffn[:1] + [0] + ffn[2:]},
                     tensors=lambda n, a: None if n.startswith("blk.1.ffn_") else a)
    ref = llama_cpp_logits(runtime(bare, n_ctx=64), TOKENS)
    x = jnp.asarray(TOKENS[None], jnp.int32)
    attn = jnp.ones(params.config.num_hidden_layers).at[1].set(0.0)
    assert close(np.asarray(jp.forward(params, x, {"attn": attn}))[0], ref)
    assert not close(np.asarray(jp.forward(params, x))[0], ref)


def test_llama_cpp_needs_heads_in_layer_0(tiny, tmp_path):
    """Why an attention-free layer 0 gets a zero 1-head attention when later layers attend: without
    it llama.cpp derives head size 0 and rejects the later layers' attention tensors."""
    params, path = tiny["non-uniform"]
    heads, kv = gguf_field(path, "deci.attention.head_count"), gguf_field(path, "deci.attention.head_count_kv")
    assert heads[0] == kv[0] == 1
    bare = copy_gguf(path, tmp_path / "bare.gguf",
                     keys={"deci.attention.head_count": [0] + heads[1:], "deci.attention.head_count_kv": [0] + kv[1:]},
                     tensors=lambda n, a: None if n.startswith("blk.0.attn_") else a)
    with pytest.raises(ValueError, match="Failed to load model"):  # blk.1.attn_q: expected [32, 0]
        runtime(bare, n_ctx=64)


def gguf_field(path, key):
    import gguf
    return gguf.GGUFReader(str(path)).fields[key].contents()


def test_tiny_text_tokenization_matches_llama_cpp(tiny):
    """The BPE metadata built from the tokenizers backend tokenizes plain text like the backend."""
    llm = runtime(tiny["dense"][1], n_ctx=64)
    text = jp.bundled_text("prideprejudice")[2000:2600]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tiny_bpe().encode(text)


# ----------------------------------------------------------------------------- SmolLM2

def smollm2_gates(cfg):
    """Non-uniform: layers 0 and 28 without attention, layer 15 without FFN (keeps attention), K/V
    groups (3, 2, 1) in layer 7, a head fewer in layer 20, 1/16 of the FFN channels fewer in every
    third layer (perplexity 194 against 22 dense: damaged, but its greedy text is not degenerate)."""
    L, H, F = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    rng = np.random.default_rng(0)
    heads, ffn = np.ones((L, H), np.float32), np.ones((L, F), np.float32)
    heads[7, [5, 7, 8]] = 0
    heads[20, 4] = 0
    for i in range(1, L, 3):
        ffn[i, rng.choice(F, F // 16, replace=False)] = 0
    attn, mlp = np.ones(L, np.float32), np.ones(L, np.float32)
    attn[[0, 28]] = 0
    mlp[15] = 0
    return {"heads": jnp.asarray(heads), "ffn": jnp.asarray(ffn), "attn": jnp.asarray(attn), "mlp": jnp.asarray(mlp)}


@pytest.fixture(scope="module")
def smollm2_models(smollm2, tmp_path_factory):
    params, tok = smollm2
    cfg = params.config
    ffn = np.ones((cfg.num_hidden_layers, cfg.intermediate_size), np.float32)
    ffn[:, ::8] = 0  # every 8th FFN channel of every layer
    uniform = jp.compact(params, {"ffn": jnp.asarray(ffn)})
    assert uniform.config.layer_shapes is None and uniform.config.intermediate_size == 1344
    small = jp.compact(params, smollm2_gates(cfg))
    shapes = [dict(d) for d in small.config.layer_shapes]
    assert shapes[0]["n_heads"] == shapes[28]["n_heads"] == 0 and shapes[15]["ffn_dim"] == 0 < shapes[15]["n_heads"]
    assert tuple(shapes[7]["kv_groups"]) == (3, 2, 1)
    d = tmp_path_factory.mktemp("smollm2_gguf")
    return {kind: (p, jp.save(p, str(d / f"{kind}.gguf"), tokenizer=tok))
            for kind, p in (("dense", params), ("uniform", uniform), ("non-uniform", small))}


@pytest.fixture(scope="module")
def windows(smollm2):
    ev = jp.eval_windows(smollm2[1], jp.bundled_text("prideprejudice"), seqlen=SEQLEN, max_windows=20)
    return ev[[0, 19]]  # two windows of 256 tokens, far apart


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "uniform", "non-uniform"])
def test_smollm2_perplexity_equals_llama_cpp(smollm2_models, windows, kind):
    params, path = smollm2_models[kind]
    ours = jp.perplexity(params, windows, seqlen=SEQLEN)
    ref = llama_cpp_perplexity(runtime(path), windows)
    print(f"{kind}: jaxprune {ours:.4f}, llama.cpp {ref:.4f}")
    assert abs(ours - ref) / ref < 0.01, (ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "non-uniform"])
def test_smollm2_greedy_continuation_equals_llama_cpp(smollm2, smollm2_models, kind):
    params, path = smollm2_models[kind]
    prompt = smollm2[1].encode("It is a truth universally acknowledged, that a single man in possession")
    ours = jp.generate(params, [prompt], 16, stop_token_ids=[])[0]
    ref = llama_cpp_greedy(runtime(path), prompt, 16)
    print(f"{kind}: {smollm2[1].decode(ours)!r}")
    assert ours == ref


@pytest.mark.slow
def test_smollm2_tokenizer_copied_from_its_gguf(smollm2, smollm2_models):
    """The copied `tokenizer.ggml.*` fields (pre-tokenizer 'smollm' included): llama.cpp tokenizes
    text like jaxprune's tokenizer."""
    llm = runtime(smollm2_models["dense"][1], n_ctx=64)
    text = jp.bundled_text("northangerabbey")[20000:24000] + " 1815, £300 — naïve <|im_start|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == smollm2[1].encode(text)
