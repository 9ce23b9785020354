"""Text metrics of generated answers: SQuAD normalisation and token F1, the final number and
answer accuracy, and embedding cosine under any `embed_fn`.

Example:
    >>> token_f1("The answer: 42.", "answer 42")
    1.0
    >>> answer_accuracy("4 or 42 or 420", "42")      # the final number counts
    0.0
"""

from __future__ import annotations

import collections
import decimal
import re
import string

import numpy as np

from jaxprune.errors import InvalidArgumentError

# --------------------------------------------------------------------------- metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# An int or decimal with optional thousands separators; a minus sign counts only
# when it does not follow a word character ("3-5" is 3 and 5, not 3 and -5).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 on normalised bags of tokens (both empty: 1.0; one empty: 0.0).

    Example:
        >>> round(token_f1("the cat sat", "a cat sat down"), 4)     # P=2/2, R=2/3
        0.8
    """
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    same = sum((collections.Counter(p) & collections.Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def final_number(text: str) -> decimal.Decimal | None:
    """The last number in `text` (ints, decimals, negatives; commas removed), or None.

    Example:
        >>> final_number("so 1,200 - 3 = -4.50.")
        Decimal('-4.50')
        >>> final_number("no digits") is None
        True
    """
    found = _NUMBER.findall(text)
    return decimal.Decimal(found[-1].replace(",", "")) if found else None


def answer_accuracy(generation: str, reference: str) -> float:
    """1.0 if the final number of `generation` equals that of `reference`, else 0.0.

    Numbers compare by value ("3.0" == "3"); a generation without a number
    scores 0. A reference without any number falls back to exact match of the
    normalised texts (`normalize_answer`).

    Example:
        >>> answer_accuracy("12 + 30 = 42.0", "#### 42"), answer_accuracy("4 or 42 or 420", "42")
        (1.0, 0.0)
    """
    ref = final_number(reference)
    if ref is None:
        return float(normalize_answer(generation) == normalize_answer(reference))
    gen = final_number(generation)
    return float(gen is not None and gen == ref)


def embedding_cosine(generations: list[str], references: list[str], embed_fn) -> np.ndarray:
    """Cosine similarity [n] of each generation with its reference under `embed_fn`.

    `embed_fn(list[str]) -> array [n, d]` is called once on generations + references;
    a zero embedding has similarity 0.

    Example:
        >>> embed = lambda texts: np.array([[len(t), 1.0] for t in texts])
        >>> embedding_cosine(["ab"], ["ab"], embed).round(6).tolist()
        [1.0]
    """
    n = len(generations)
    if n != len(references):
        raise InvalidArgumentError(f"{n} generations but {len(references)} references")
    if n == 0:
        return np.zeros(0)
    emb = np.asarray(embed_fn(list(generations) + list(references)), np.float64)
    if emb.ndim != 2 or emb.shape[0] != 2 * n:
        raise InvalidArgumentError(f"embed_fn must return [n, d] for n = {2 * n} texts, got shape {emb.shape}")
    return cosine_rows(emb[:n], emb[n:])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape != b.shape or a.ndim != 2:
        raise InvalidArgumentError(f"embed_fn must return [n, d] for n texts, got shapes {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)


