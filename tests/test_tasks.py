"""jaxprune.evaluation.tasks: construction invariants of the offline proxy tasks, and their scoring against numpy."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jaxprune as jp
from jaxprune.evaluation import tasks
from jaxprune.errors import DataError, InvalidArgumentError

from evaluation_helpers import ByteTok, np_scores, successor_params, tiny_params


def squeeze(s: str) -> str:
    return " ".join(s.split())


@pytest.fixture(scope="module")
def novel():
    return jp.bundled_text("prideprejudice")


@pytest.fixture(scope="module")
def flat(novel):
    return squeeze(novel)


def test_sentence_split():
    assert tasks.split_sentences('"Well, Mrs. Long!" said he. "She is here?" Yes. St. Paul\'s? No.') == [
        '"Well, Mrs. Long!" said he.', '"She is here?"', "Yes.", "St. Paul's?", "No."]


def test_last_word_task_invariants(novel, flat):
    ex = tasks.last_word_task(novel, n=60, context_words=40, seed=0)
    assert len(ex) == 60 and ex == tasks.last_word_task(novel, n=60, context_words=40, seed=0)
    assert ex != tasks.last_word_task(novel, n=60, context_words=40, seed=1)
    assert tasks.last_word_task(n=60, context_words=40) == ex            # prideprejudice by default
    positions = []
    for e in ex:
        assert re.fullmatch(r"[A-Za-z]{3,}", e.target) and e.target.lower() not in tasks.STOPWORDS
        earlier = {w.lower() for w in re.findall(r"[A-Za-z]+", e.context)}
        assert e.target.lower() in earlier                                  # guessable from the passage
        assert e.context == e.context.rstrip() and 40 <= len((e.context + " " + e.target).split()) <= 80
        passage = squeeze(e.context) + " " + e.target
        at = flat.find(passage)
        assert at >= 0, passage[-80:]                                       # real text, in order
        after = flat[at + len(passage):at + len(passage) + 1]
        assert after in ".,;:!?\"')", after                                   # the word closes its sentence
        assert re.search(r"[.!?][\"')_]*$", flat[at + len(passage):].split(" ", 1)[0])
        positions.append(at)
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


def test_continuation_task_invariants(novel, flat):
    ex = tasks.continuation_task(novel, n=80, n_choices=4, seed=0)
    assert len(ex) == 80 and ex == tasks.continuation_task(novel, n=80, n_choices=4, seed=0)
    assert ex != tasks.continuation_task(novel, n=80, n_choices=4, seed=5)
    labels = [e.label for e in ex]
    assert set(labels) == {0, 1, 2, 3}                                       # the truth moves around
    for e in ex:
        assert len(e.choices) == 4 and 0 <= e.label < 4
        truth = e.choices[e.label]
        assert flat.find(squeeze(e.context) + " " + truth) >= 0               # context then its true next sentence
        assert len(set(e.choices)) == 4 and all(c != truth for i, c in enumerate(e.choices) if i != e.label)
        n = len(truth.split())
        assert 8 <= n <= 40
        for i, c in enumerate(e.choices):
            assert c in flat                                                 # distractors are sentences of the text
            if i != e.label:
                assert abs(len(c.split()) - n) <= max(2, round(0.2 * n))      # of similar length
                assert flat.find(squeeze(e.context) + " " + c) < 0            # and not the true continuation
    three = tasks.continuation_task(novel, n=10, n_choices=3, seed=0)
    assert all(len(e.choices) == 3 for e in three)


def test_generation_task(novel, flat):
    ex = tasks.generation_task(novel, n=8, context_words=30, reference_words=12, seed=2)
    assert ex == tasks.generation_task(novel, n=8, context_words=30, reference_words=12, seed=2)
    for e in ex:
        assert len(e.reference.split()) == 12 and len(e.prompt.split()) >= 30
        assert flat.find(squeeze(e.prompt) + " " + e.reference) >= 0


def test_custom_text_and_errors():
    text = "Emma saw the horse and the field.\nShe rode the horse.\n\nChapter 2\n\nShe left."
    ex = tasks.last_word_task(text, n=1, context_words=8)
    assert ex == [tasks.LastWordExample("Emma saw the horse and the field. She rode the", "horse")]
    with pytest.raises(DataError, match="fewer than n=2"):
        tasks.last_word_task(text, n=2, context_words=8)
    with pytest.raises(DataError, match="prose"):
        tasks.continuation_task("Chapter 1\n\nCHAPTER TWO", n=1)
    with pytest.raises(InvalidArgumentError, match="n_choices"):
        tasks.continuation_task(text, n=1, n_choices=1)
    with pytest.raises(InvalidArgumentError, match="text"):
        tasks.last_word_task(123)
    with pytest.raises(InvalidArgumentError, match="ContinuationExample"):
        tasks.choice_scores(tiny_params(), ByteTok(), ex)


def test_choice_scores_match_numpy():
    params, tok = tiny_params(seed=1), ByteTok()
    ex = tasks.continuation_task(jp.bundled_text("sensesensibility"), n=4, n_choices=3, context_sentences=1,
                                 max_words=12, seed=0)
    s = tasks.choice_scores(params, tok, ex, batch_size=4)
    assert s["logprob"].shape == (4, 3)
    for i, e in enumerate(ex):
        for j, c in enumerate(e.choices):
            ctx, cont = tok.encode(e.context), tok.encode(" " + c)
            ref, _ = np_scores(params, ctx + cont)
            assert s["logprob"][i, j] == pytest.approx(ref[-len(cont):].sum(), rel=1e-4, abs=1e-4)
            assert s["chars"][i, j] == len(c) and s["tokens"][i, j] == len(cont)
    labels = np.array([e.label for e in ex])
    for norm, div in [(None, 1.0), ("chars", s["chars"]), ("tokens", s["tokens"])]:
        expected = float((np.argmax(s["logprob"] / div, axis=1) == labels).mean())
        assert tasks.continuation_accuracy(params, tok, ex, normalize=norm) == expected
    with pytest.raises(InvalidArgumentError, match="normalize"):
        tasks.continuation_accuracy(params, tok, ex, normalize="bytes")


def test_continuation_accuracy_on_a_model_that_knows_the_answer():
    # greedy chain after "x": " abc." -- the true choice is the only one the model predicts
    params, tok = successor_params({"x": " ", " ": "a", "a": "b", "b": "c", "c": "."}), ByteTok()
    ex = [tasks.ContinuationExample("It was x", ("qqqq", "abc.", "zzzz"), 1),
          tasks.ContinuationExample("So x", ("abc.", "zyx."), 0)]
    with pytest.raises(InvalidArgumentError, match="choices"):
        tasks.choice_scores(params, tok, ex)
    ex[1] = tasks.ContinuationExample("So x", ("abc.", "zyx.", "hmm."), 0)
    assert tasks.continuation_accuracy(params, tok, ex) == 1.0
    wrong = [tasks.ContinuationExample(e.context, e.choices, (e.label + 1) % 3) for e in ex]
    assert tasks.continuation_accuracy(params, tok, wrong) == 0.0


def test_last_word_scores_match_numpy():
    params, tok = successor_params({"x": " ", " ": "a", "a": "b", "b": "c"}), ByteTok()
    ex = [tasks.LastWordExample("the abc and x", "abc"), tasks.LastWordExample("the abd and x", "abd"),
          tasks.LastWordExample("so x", "ab"), tasks.LastWordExample("a bit of text x", "qrs")]
    lp, greedy = tasks.last_word_scores(params, tok, ex)
    assert greedy.tolist() == [True, False, True, False]
    for e, a, g in zip(ex, lp, greedy):
        ctx = e.context.rstrip()
        ids = tok.encode(ctx + " " + e.target)
        k = len(ids) - len(tok.encode(ctx))
        ref, ref_greedy = np_scores(params, ids)
        assert a == pytest.approx(ref[-k:].sum(), rel=1e-5, abs=1e-5)
        assert g == ref_greedy[-k:].all()
    assert tasks.last_word_accuracy(params, tok, ex) == 0.5


def test_real_examples_score_on_a_tiny_model(novel):
    params, tok = tiny_params(seed=2), ByteTok()
    ex = tasks.last_word_task(novel, n=5, context_words=20)
    lp, greedy = tasks.last_word_scores(params, tok, ex, batch_size=2)
    for e, a in zip(ex, lp):
        ids = tok.encode(e.context + " " + e.target)
        ref, _ = np_scores(params, ids)
        assert a == pytest.approx(ref[-(len(e.target) + 1):].sum(), rel=1e-5)


def test_lm_eval_export(tmp_path):
    import json
    ex = tasks.continuation_task(n=3, seed=0)
    path = tasks.write_lm_eval_task(ex, str(tmp_path), "pp_next")
    rows = [json.loads(line) for line in (tmp_path / "pp_next.jsonl").read_text().splitlines()]
    assert [tasks.ContinuationExample(r["context"], tuple(r["choices"]), r["label"]) for r in rows] == ex
    text = open(path).read()
    assert "output_type: multiple_choice" in text and str(tmp_path / "pp_next.jsonl") in text
    lw = tasks.last_word_task(n=2)
    assert "output_type: loglikelihood" in open(tasks.write_lm_eval_task(lw, str(tmp_path), "pp_lw")).read()
    with pytest.raises(InvalidArgumentError):
        tasks.write_lm_eval_task(ex + lw, str(tmp_path), "mixed")
    with pytest.raises(InvalidArgumentError):
        tasks.write_lm_eval_task(ex, str(tmp_path), "../escape")
