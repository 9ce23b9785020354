"""jaxprune.evaluation.generation_metrics: ROUGE, embedding similarity and efficiency columns on a tiny model."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

import jaxprune as jp                                                      # noqa: E402
from jaxprune.evaluation import generation_metrics as gm                              # noqa: E402
from jaxprune.errors import InvalidArgumentError                           # noqa: E402
from jaxprune.models import hidden_states                                  # noqa: E402
from jaxprune.evaluation.text_metrics import embedding_cosine                           # noqa: E402

from evaluation_helpers import ByteTok, successor_params, tiny_params  # noqa: E402

PROMPTS = ["It was a", "Mr. Bennet replied", "She was x"]
REFS = ["bcd and more", "that he had not", "abcd and so on"]
SUCCESSOR = {"x": " ", " ": "a", "a": "b", "b": "c", "c": "d", "d": " "}


def walk(prompt: str, n: int) -> str:
    """The successor model's greedy continuation, by following the chain."""
    out, c = "", prompt[-1]
    for _ in range(n):
        c = SUCCESSOR[c]
        out += c
    return out


def test_rouge_of_identical_texts_is_one():
    texts = ["the cats were sitting on the mat", "Mr. Darcy bowed."]
    assert gm.rouge_scores(texts, texts) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    r = gm.rouge_scores(["completely different words"], ["the cats were sitting"])
    assert r == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    with pytest.raises(InvalidArgumentError):
        gm.rouge_scores(["a"], ["a", "b"])
    with pytest.raises(InvalidArgumentError):
        gm.rouge_scores("a", "a")


def test_generation_metrics_match_direct_computations():
    params = successor_params(SUCCESSOR)
    tok = ByteTok()
    embed = lambda texts: np.array([[len(t), t.count("a") + 1.0, t.count(" ")] for t in texts])
    m = gm.evaluate_generation(params, tok, PROMPTS, REFS, max_new_tokens=10, embed_fn=embed, batch_size=2)
    gens = m["generations"]
    assert gens == [walk(p, 10) for p in PROMPTS] == ["bcd abcd a", " abcd abcd", " abcd abcd"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert m[k] == pytest.approx(np.mean([scorer.score(r, g)[k].fmeasure for g, r in zip(gens, REFS)]))
    assert m["rouge1"] > 0
    assert m["embedding_similarity"] == pytest.approx(embedding_cosine(gens, REFS, embed).mean())
    assert m["n"] == 3 and m["generated_tokens"] == sum(len(tok.encode(g)) for g in gens) == 30
    assert m["generation_seconds"] > 0
    assert m["tokens_per_second"] == pytest.approx(m["generated_tokens"] / m["generation_seconds"])


def test_nonzero_parameters_counts_zeros():
    params = tiny_params(seed=3)
    pruned = jp.apply_masks(params, jp.magnitude(params, 0.5))
    for p in (params, pruned):
        leaves = [np.asarray(x) for x in jax.tree.leaves(p)]
        assert gm.nonzero_parameters(p) == (sum(int(np.count_nonzero(x)) for x in leaves),
                                            sum(x.size for x in leaves))
    nz, total = gm.nonzero_parameters(pruned)
    assert nz < total
    m = gm.evaluate_generation(pruned, ByteTok(), PROMPTS[:1], REFS[:1], max_new_tokens=3)
    assert (m["nonzero_params"], m["total_params"]) == (nz, total)


def test_default_embedder_is_mean_of_hidden_states():
    params, tok = tiny_params(seed=4), ByteTok()
    embed = gm.hidden_state_embedder(params, tok, batch_size=2)
    texts = ["a", "Mr. Bennet made no answer.", "It is a truth"]
    got = embed(texts)
    for t, row in zip(texts, got):
        h = np.asarray(hidden_states(params, jnp.asarray([tok.encode(t)], jnp.int32)), np.float64)[0]
        ref = h[1:].mean(0) if len(h) > 1 else h[0]
        np.testing.assert_allclose(row, ref, rtol=1e-4, atol=1e-5)
    m = gm.evaluate_generation(params, tok, PROMPTS, REFS, max_new_tokens=4)
    assert m["embedding_similarity"] == pytest.approx(embedding_cosine(m["generations"], REFS, embed).mean(),
                                                      rel=1e-5)


def test_rouge_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ImportError, match=r"jaxprune\[eval\]"):
        gm.rouge_scores(["a"], ["a"])
