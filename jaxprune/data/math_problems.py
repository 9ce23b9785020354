"""Grade-school math word problems with step-by-step rationales, generated offline from a seed.

25 templates of 1 to 3 arithmetic steps in five themes (shopping, ages, rates, sharing,
time). Every number is drawn from a `numpy` generator seeded by the caller, every division
is exact, and every answer is a whole number, so the final number of a generation can be
checked exactly (`jaxprune.evaluation.text_metrics.answer_accuracy`).

The split is **by template**: the held-out templates (`HELD_OUT_TEMPLATES`, one per theme)
never produce a pruning problem, so a model pruned on `problems("pruning", ...)` is evaluated
on `problems("held_out", ...)` whose wording and structure it has not seen.

`reasoning_prompt` builds the prompt of "Reshaping Bonsai": one worked example (question,
rationale, answer), then the question and "Let's think step by step to get the rationale and
the answer:". The worked example always comes from a pruning template.

Example:
    >>> p = problems("pruning", 2, seed=0)
    >>> [x.template for x in p] == [x.template for x in problems("pruning", 2, seed=0)]
    True
    >>> p[0].reference.endswith(f"The answer is {p[0].answer}.")
    True
    >>> set(x.template for x in problems("held_out", 50, seed=1)) <= set(HELD_OUT_TEMPLATES)
    True
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxprune.errors import InvalidArgumentError

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kate", "Liam",
         "Maya", "Noah", "Olga", "Pedro", "Rosa", "Sam", "Tara", "Victor")
ITEMS = ("apple", "notebook", "pencil", "cupcake", "ticket", "sandwich", "marker", "candle", "plant", "book")
THINGS = ("marble", "sticker", "cookie", "card", "stamp", "shell", "bead", "coin")
PROMPT_CUE = "Let's think step by step to get the rationale and the answer:"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One word problem: `question`, step-by-step `rationale`, whole-number `answer`, its `template`."""

    question: str
    rationale: str
    answer: int
    template: str

    @property
    def reference(self) -> str:
        """The text a model should generate: the rationale, then "The answer is N."."""
        return f"{self.rationale} The answer is {self.answer}."


def _r(rng, lo, hi):
    return int(rng.integers(lo, hi + 1))


def _pick(rng, seq, k=1):
    idx = rng.choice(len(seq), size=k, replace=False)
    return [seq[i] for i in idx] if k > 1 else seq[idx[0]]


# -------------------------------------------------------------------------- shopping

def _buy_items(rng):
    n, item, a, p = _pick(rng, NAMES), _pick(rng, ITEMS), _r(rng, 2, 9), _r(rng, 2, 12)
    return (f"{n} buys {a} {item}s at ${p} each. How many dollars does {n} spend?",
            f"Each {item} costs ${p}, so {a} {item}s cost {a} x {p} = {a * p} dollars.", a * p)


def _change(rng):
    n, item, a, p = _pick(rng, NAMES), _pick(rng, ITEMS), _r(rng, 2, 6), _r(rng, 2, 8)
    bill = 50 if a * p < 50 else 100
    return (f"{n} buys {a} {item}s at ${p} each and pays with a ${bill} bill. How many dollars of change "
            f"does {n} get?",
            f"The {item}s cost {a} x {p} = {a * p} dollars. The change is {bill} - {a * p} = {bill - a * p} dollars.",
            bill - a * p)


def _two_items(rng):
    n = _pick(rng, NAMES)
    i1, i2 = _pick(rng, ITEMS, 2)
    a, p, b, q = _r(rng, 2, 6), _r(rng, 2, 9), _r(rng, 2, 6), _r(rng, 2, 9)
    return (f"{n} buys {a} {i1}s at ${p} each and {b} {i2}s at ${q} each. How many dollars does {n} spend "
            f"in total?",
            f"The {i1}s cost {a} x {p} = {a * p} dollars. The {i2}s cost {b} x {q} = {b * q} dollars. "
            f"Together that is {a * p} + {b * q} = {a * p + b * q} dollars.", a * p + b * q)


def _discount(rng):
    n, item = _pick(rng, NAMES), _pick(rng, ITEMS)
    p, d, a = _r(rng, 8, 20), _r(rng, 1, 5), _r(rng, 2, 6)
    return (f"A {item} costs ${p}, but today it is ${d} cheaper. {n} buys {a} {item}s today. How many dollars "
            f"does {n} pay?",
            f"Today one {item} costs {p} - {d} = {p - d} dollars. So {a} {item}s cost {a} x {p - d} = "
            f"{a * (p - d)} dollars.", a * (p - d))


def _budget_left(rng):
    n = _pick(rng, NAMES)
    i1, i2 = _pick(rng, ITEMS, 2)
    x, y = _r(rng, 3, 20), _r(rng, 3, 20)
    m = x + y + _r(rng, 1, 30)
    return (f"{n} has ${m}. {n} spends ${x} on a {i1} and ${y} on a {i2}. How many dollars does {n} have left?",
            f"{n} spends {x} + {y} = {x + y} dollars. {n} has {m} - {x + y} = {m - x - y} dollars left.", m - x - y)


# -------------------------------------------------------------------------- ages

def _age_future(rng):
    n, a, b = _pick(rng, NAMES), _r(rng, 5, 40), _r(rng, 2, 15)
    return (f"{n} is {a} years old. How old will {n} be in {b} years?",
            f"In {b} years {n} will be {a} + {b} = {a + b} years old.", a + b)


def _age_older(rng):
    n1, n2 = _pick(rng, NAMES, 2)
    a, b = _r(rng, 4, 30), _r(rng, 2, 12)
    return (f"{n1} is {a} years old. {n2} is {b} years older than {n1}. How old is {n2}?",
            f"{n2} is {a} + {b} = {a + b} years old.", a + b)


def _age_times(rng):
    n1, n2 = _pick(rng, NAMES, 2)
    a, k, b = _r(rng, 3, 12), _r(rng, 2, 4), _r(rng, 2, 10)
    return (f"{n1} is {a} years old. {n2} is {k} times as old as {n1}. How old will {n2} be in {b} years?",
            f"{n2} is {k} x {a} = {k * a} years old now. In {b} years {n2} will be {k * a} + {b} = {k * a + b} "
            f"years old.", k * a + b)


def _age_sum(rng):
    n1, n2 = _pick(rng, NAMES, 2)
    a, b = _r(rng, 15, 40), _r(rng, 2, 12)
    return (f"{n1} is {a} years old and {n2} is {b} years younger than {n1}. What is the sum of their ages?",
            f"{n2} is {a} - {b} = {a - b} years old. The sum of their ages is {a} + {a - b} = {2 * a - b}.", 2 * a - b)


def _age_past(rng):
    n, a, b = _pick(rng, NAMES), _r(rng, 20, 70), _r(rng, 2, 15)
    return (f"{n} is {a} years old. How old was {n} {b} years ago?",
            f"{b} years ago {n} was {a} - {b} = {a - b} years old.", a - b)


# -------------------------------------------------------------------------- rates

def _distance(rng):
    s, h = _r(rng, 30, 90), _r(rng, 2, 6)
    return (f"A car drives at {s} kilometers per hour for {h} hours. How many kilometers does it travel?",
            f"The car travels {s} x {h} = {s * h} kilometers.", s * h)


def _pages(rng):
    n, p, d = _pick(rng, NAMES), _r(rng, 5, 30), _r(rng, 3, 14)
    return (f"{n} reads {p} pages every day. How many pages does {n} read in {d} days?",
            f"{n} reads {p} x {d} = {p * d} pages.", p * d)


def _wages(rng):
    n, w, h, d = _pick(rng, NAMES), _r(rng, 8, 20), _r(rng, 3, 8), _r(rng, 2, 6)
    return (f"{n} earns ${w} per hour and works {h} hours a day for {d} days. How many dollars does {n} earn?",
            f"Each day {n} earns {w} x {h} = {w * h} dollars. In {d} days that is {w * h} x {d} = {w * h * d} "
            f"dollars.", w * h * d)


def _fill_tank(rng):
    r, k = _r(rng, 2, 12), _r(rng, 3, 15)
    return (f"A tank holds {r * k} liters. A pipe fills it with {r} liters per minute. How many minutes does it "
            f"take to fill the tank?",
            f"It takes {r * k} / {r} = {k} minutes.", k)


def _walk_run(rng):
    n, a, h1, b, h2 = _pick(rng, NAMES), _r(rng, 3, 6), _r(rng, 1, 3), _r(rng, 8, 12), _r(rng, 1, 3)
    return (f"{n} walks at {a} kilometers per hour for {h1} hours, then runs at {b} kilometers per hour for {h2} "
            f"hours. How many kilometers does {n} cover?",
            f"Walking, {n} covers {a} x {h1} = {a * h1} kilometers. Running, {n} covers {b} x {h2} = {b * h2} "
            f"kilometers. In total that is {a * h1} + {b * h2} = {a * h1 + b * h2} kilometers.", a * h1 + b * h2)


# -------------------------------------------------------------------------- sharing

def _share_equal(rng):
    n, t, k, e = _pick(rng, NAMES), _pick(rng, THINGS), _r(rng, 2, 8), _r(rng, 2, 12)
    return (f"{n} shares {k * e} {t}s equally among {k} friends. How many {t}s does each friend get?",
            f"Each friend gets {k * e} / {k} = {e} {t}s.", e)


def _keep_and_share(rng):
    n, t, k, e, x = _pick(rng, NAMES), _pick(rng, THINGS), _r(rng, 2, 6), _r(rng, 2, 10), _r(rng, 2, 10)
    total = k * e + x
    return (f"{n} has {total} {t}s, keeps {x} and shares the rest equally among {k} friends. How many {t}s does "
            f"each friend get?",
            f"{n} shares {total} - {x} = {k * e} {t}s. Each friend gets {k * e} / {k} = {e} {t}s.", e)


def _groups(rng):
    k, g = _r(rng, 3, 8), _r(rng, 3, 9)
    return (f"{k * g} students are split into groups of {k}. How many groups are there?",
            f"There are {k * g} / {k} = {g} groups.", g)


def _boxes(rng):
    t, k, e = _pick(rng, THINGS), _r(rng, 2, 6), _r(rng, 3, 10)
    b = _r(rng, 2, 6)
    total = k * e * b
    per_box = total // b
    return (f"There are {b} boxes with {per_box} {t}s in each. The {t}s are shared equally among {k} classes. "
            f"How many {t}s does each class get?",
            f"There are {b} x {per_box} = {total} {t}s. Each class gets {total} / {k} = {total // k} {t}s.",
            total // k)


def _pizza(rng):
    n, s, p, k = _pick(rng, NAMES), _r(rng, 6, 12), _r(rng, 2, 5), _r(rng, 2, 6)
    e = _r(rng, 1, max(1, (s * p) // k - 1))
    return (f"A pizza has {s} slices. {n} orders {p} pizzas and {k} people eat {e} slices each. How many slices are "
            f"left?",
            f"There are {s} x {p} = {s * p} slices. The people eat {k} x {e} = {k * e} slices. That leaves "
            f"{s * p} - {k * e} = {s * p - k * e} slices.", s * p - k * e)


# -------------------------------------------------------------------------- time

def _practice(rng):
    n, m, d = _pick(rng, NAMES), _r(rng, 10, 60), _r(rng, 3, 10)
    return (f"{n} practices the piano for {m} minutes every day. How many minutes does {n} practice in {d} days?",
            f"{n} practices {m} x {d} = {m * d} minutes.", m * d)


def _movie_minutes(rng):
    h, m = _r(rng, 1, 3), _r(rng, 5, 55)
    return (f"A movie lasts {h} hours and {m} minutes. How many minutes long is the movie?",
            f"{h} hours are {h} x 60 = {60 * h} minutes. The movie lasts {60 * h} + {m} = {60 * h + m} minutes.",
            60 * h + m)


def _finish_hour(rng):
    n, h, d = _pick(rng, NAMES), _r(rng, 6, 12), _r(rng, 2, 8)
    return (f"{n} starts working at {h} o'clock and works for {d} hours without a break. At what hour (on a "
            f"24-hour clock) does {n} finish?",
            f"{n} finishes at {h} + {d} = {h + d} o'clock.", h + d)


def _exercise(rng):
    n, x, w, m = _pick(rng, NAMES), _r(rng, 2, 6), _r(rng, 2, 8), _r(rng, 15, 60)
    return (f"{n} exercises {x} days a week for {w} weeks, {m} minutes each time. How many minutes does {n} "
            f"exercise in total?",
            f"{n} exercises {x} x {w} = {x * w} times. That is {x * w} x {m} = {x * w * m} minutes.", x * w * m)


def _savings(rng):
    n, s, k = _pick(rng, NAMES), _r(rng, 3, 25), _r(rng, 3, 12)
    return (f"{n} saves ${s} every week. How many weeks does it take {n} to save ${s * k}?",
            f"It takes {s * k} / {s} = {k} weeks.", k)


TEMPLATES = {
    "buy_items": _buy_items, "change": _change, "two_items": _two_items, "discount": _discount,
    "budget_left": _budget_left,
    "age_future": _age_future, "age_older": _age_older, "age_times": _age_times, "age_sum": _age_sum,
    "age_past": _age_past,
    "distance": _distance, "pages": _pages, "wages": _wages, "fill_tank": _fill_tank, "walk_run": _walk_run,
    "share_equal": _share_equal, "keep_and_share": _keep_and_share, "groups": _groups, "boxes": _boxes,
    "pizza": _pizza,
    "practice": _practice, "movie_minutes": _movie_minutes, "finish_hour": _finish_hour, "exercise": _exercise,
    "savings": _savings,
}
"""name -> template; five per theme, in theme order (shopping, ages, rates, sharing, time)."""

HELD_OUT_TEMPLATES = ("budget_left", "age_sum", "walk_run", "boxes", "exercise")
"""One per theme (each theme's fifth, chosen by position, not by how models do on it)."""

PRUNING_TEMPLATES = tuple(t for t in TEMPLATES if t not in HELD_OUT_TEMPLATES)


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    """`n` problems of the ``"pruning"`` or ``"held_out"`` templates, cycling through the split's
    templates in a seeded random order; the same (split, n, seed) gives the same problems."""
    if split not in ("pruning", "held_out"):
        raise InvalidArgumentError(f"split must be 'pruning' or 'held_out', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidArgumentError(f"n must be a positive integer, got {n!r}")
    names = PRUNING_TEMPLATES if split == "pruning" else HELD_OUT_TEMPLATES
    rng = np.random.default_rng([seed, 0 if split == "pruning" else 1])
    out = []
    while len(out) < n:
        for i in rng.permutation(len(names)):
            if len(out) == n:
                break
            q, r, a = TEMPLATES[names[i]](rng)
            out.append(Problem(q, r, int(a), names[i]))
    return out


def worked_example(seed: int = 0) -> Problem:
    """The one worked example of every prompt: a multi-step problem from a pruning template."""
    return Problem(*TEMPLATES["two_items"](np.random.default_rng([seed, 2])), template="two_items")


def reasoning_prompt(problem: Problem, example: Problem | None = None) -> str:
    """The study's prompt: a worked example (question, rationale, answer), then the question and
    "Let's think step by step to get the rationale and the answer:".

    Example:
        >>> p = problems("held_out", 1, seed=0)[0]
        >>> reasoning_prompt(p).endswith(p.question + "\\n" + PROMPT_CUE)
        True
    """
    ex = worked_example() if example is None else example
    return (f"Question: {ex.question}\n{PROMPT_CUE}\n{ex.reference}\n\n"
            f"Question: {problem.question}\n{PROMPT_CUE}")
