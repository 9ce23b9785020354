"""The math word-problem generator: deterministic, split by template, arithmetic that checks out."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from jaxprune.data import math_problems as mp
from jaxprune.errors import InvalidArgumentError
from jaxprune.evaluation.text_metrics import answer_accuracy, final_number

_STEP = re.compile(r"(\d+) ([x+/-]) (\d+) = (\d+)")
_OPS = {"x": lambda a, b: a * b, "+": lambda a, b: a + b, "-": lambda a, b: a - b, "/": lambda a, b: a / b}


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b = mp.problems("pruning", 30, seed=3), mp.problems("pruning", 30, seed=3)
    assert a == b
    assert a != mp.problems("pruning", 30, seed=4)


def test_split_by_template():
    assert len(mp.TEMPLATES) >= 20
    assert set(mp.PRUNING_TEMPLATES).isdisjoint(mp.HELD_OUT_TEMPLATES)
    assert set(mp.PRUNING_TEMPLATES) | set(mp.HELD_OUT_TEMPLATES) == set(mp.TEMPLATES)
    for seed in range(5):
        prune = mp.problems("pruning", 200, seed=seed)
        held = mp.problems("held_out", 200, seed=seed)
        assert {p.template for p in prune} == set(mp.PRUNING_TEMPLATES)     # every template is used
        assert {p.template for p in held} == set(mp.HELD_OUT_TEMPLATES)
        assert not {p.question for p in prune} & {p.question for p in held}
    assert mp.worked_example().template in mp.PRUNING_TEMPLATES


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), split=st.sampled_from(["pruning", "held_out"]))
def test_every_step_of_every_rationale_is_right(seed, split):
    for p in mp.problems(split, 25, seed=seed):
        steps = _STEP.findall(p.rationale)
        assert 1 <= len(steps) <= 3, p
        for a, op, b, c in steps:
            assert _OPS[op](int(a), int(b)) == int(c), (p.template, p.rationale)
        assert int(steps[-1][3]) == p.answer and p.answer >= 0
        assert final_number(p.reference) == p.answer
        assert answer_accuracy(p.reference, str(p.answer)) == 1.0


def test_prompt_is_one_worked_example_then_the_question():
    p = mp.problems("held_out", 1, seed=0)[0]
    prompt = mp.reasoning_prompt(p)
    ex = mp.worked_example()
    assert prompt.startswith(f"Question: {ex.question}\n{mp.PROMPT_CUE}\n{ex.reference}")
    assert prompt.endswith(f"Question: {p.question}\n{mp.PROMPT_CUE}")
    assert prompt.count("Question:") == 2


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError):
        mp.problems("test", 3)
    with pytest.raises(InvalidArgumentError):
        mp.problems("pruning", 0)
