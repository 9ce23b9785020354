"""Offline proxy tasks from bundled public-domain text: last word (LAMBADA-like), next sentence (HellaSwag-like).

Standard downstream tasks need network downloads; these are built locally, so
pruned models can be compared on zero-shot accuracy anywhere. By default they
use `prideprejudice`, the evaluation novel, which no calibration set contains.
Construction (deterministic for a given text and seed):

1. **Paragraphs and sentences.** The text is split into paragraphs on blank
   lines, whitespace collapsed. Only prose paragraphs are kept: those with a
   lower-case letter that end in ``.``, ``!`` or ``?`` (closing quotes
   allowed), which drops headings ("Chapter 3") and letter signatures.
   Sentences end at ``.!?`` (plus closing quotes) followed by whitespace and a
   capital letter or an opening quote, except after Mr., Mrs., Dr., St., Col.
   and a few other abbreviations. A passage joins sentences with a space and
   paragraphs with a newline, and never spans a dropped paragraph (so no
   passage crosses a chapter heading).
2. **Last word** (`last_word_task`). Scanning the sentences in order, a
   passage is the shortest run of whole sentences with at least
   `context_words` words (at most twice that). Its final word (trailing
   punctuation and quotes dropped) is the target when it is alphabetic, has at
   least 3 letters, is not a stop word (`STOPWORDS`), and occurs earlier in the
   passage (case-insensitive): a stand-in for LAMBADA's human filter for words
   guessable from the broad context. The example is (passage up to the target,
   target); accepted passages do not overlap, and `n` of them are drawn with
   `random.Random(seed)` and kept in text order.
   Scoring (`last_word_accuracy`): lm-eval's `lambada` accuracy. The request is
   (context, " " + target); an example is correct when every target token is
   the model's argmax given the context and the target tokens before it (the
   greedy continuation starts with exactly the target's tokens).
3. **Next sentence** (`continuation_task`). Windows of `context_sentences`
   sentences are followed by the true next sentence, which must lie in the
   same paragraph as the window's last sentence and have `min_words` to
   `max_words` words; windows do not overlap. Each truth gets `n_choices - 1`
   distractors: distinct sentences from elsewhere in the text (not within
   `context_sentences + 1` sentences of the truth, not equal to it) whose word
   count is within 20% (at least 2 words) of the truth's, the tolerance doubling
   until enough exist. The truth goes to a position drawn with the same seeded
   generator.
   Scoring (`continuation_accuracy`): each choice is scored as lm-eval's
   `multiple_choice` does, loglikelihood of " " + choice after the context; the
   prediction is the choice with the highest loglikelihood divided by the
   choice's length in characters, i.e. lm-eval's `acc_norm` (`normalize="chars"`,
   the default); `"tokens"` divides by its token count, `None` is `acc`.
4. **Generation prompts** (`generation_task`): a passage as in 2 (any final
   word) is the prompt and the first `reference_words` words of the sentences
   that follow it in the same paragraph are the reference, for
   `jaxprune.evaluation.generation_metrics`.

`write_lm_eval_task` writes either task as a JSONL file plus an lm-eval YAML
task, so lm-evaluation-harness (with `jaxprune.evaluation.harness.JaxpruneLM`) reproduces
the same accuracies.

Example:
    >>> text = 'Anne walked to the garden with her dog. She liked the garden.'
    >>> [e.target for e in last_word_task(text, n=1, context_words=10)]
    ['garden']
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re

import numpy as np

from jaxprune.data.text import EVALUATION_TEXT, bundled_text
from jaxprune.errors import DataError, InvalidArgumentError, check_int
from jaxprune.evaluation.scoring import _check_tokenizer, encode_pair, score_pairs

STOPWORDS = frozenset("""
the and but for nor yet with from into onto upon than then that this these those there their they them
his her hers him she you your yours our ours its was were are been being have has had not all any some
one who whom whose which what when where why how very much more most such can could would should will
shall may might must did does done said say says too also only own same other own well now here
""".split())

_ABBREV = re.compile(r"(?:^|\s|\W)(?:Mr|Mrs|Messrs|Dr|St|Col|Capt|Esq|Jr|Sr|Mme|Mlle|Rev|Hon)\.$")
_BOUNDARY = re.compile(r"([.!?][\"')\]_]*)\s+(?=[\"'(\[_]*[A-Z])")
_PROSE_END = re.compile(r"[.!?][\"')\]_]*$")
_TARGET = re.compile(r"[\"'(\[]*([A-Za-z]{3,})[.,;:!?\"')\]]*")
_WORD = re.compile(r"[A-Za-z]+")


@dataclasses.dataclass(frozen=True)
class LastWordExample:
    """A passage without its final word (`context`, no trailing space) and that word (`target`)."""
    context: str
    target: str


@dataclasses.dataclass(frozen=True)
class ContinuationExample:
    """A context, candidate next sentences (`choices`, no leading space) and the true one's index."""
    context: str
    choices: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class GenerationExample:
    """A prompt passage and the reference text that follows it."""
    prompt: str
    reference: str


# --------------------------------------------------------------------------- text


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph (see the module docstring for the rule).

    Example:
        >>> split_sentences('"Oh! Mr. Bennet, how can you?" said she. It rained.')
        ['"Oh!', 'Mr. Bennet, how can you?" said she.', 'It rained.']
    """
    out, start = [], 0
    for m in _BOUNDARY.finditer(paragraph):
        end = m.start() + len(m.group(1))
        if _ABBREV.search(paragraph[start:end]):
            continue
        piece = paragraph[start:end].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def _sentences(text) -> list[tuple[int, str]]:
    """(paragraph index, sentence) for every sentence of every prose paragraph."""
    if text is None:
        text = bundled_text(EVALUATION_TEXT)
    if not isinstance(text, str):
        raise InvalidArgumentError(f"text must be a string, got {type(text).__name__}")
    out = []
    for k, para in enumerate(re.split(r"\n\s*\n", text)):
        para = " ".join(para.split())
        if not para or not any(c.islower() for c in para) or not _PROSE_END.search(para):
            continue
        out += [(k, s) for s in split_sentences(para)]
    if not out:
        raise DataError("the text holds no prose paragraph (none ends with . ! or ?)")
    return out


def _join(sents) -> str:
    parts, prev = [], None
    for k, s in sents:
        if prev is not None:
            parts.append(" " if k == prev else "\n")
        parts.append(s)
        prev = k
    return "".join(parts)


def _nwords(s: str) -> int:
    return len(s.split())


def _draw(candidates: list, n: int, seed, what: str) -> list:
    if len(candidates) < n:
        raise DataError(f"the text yields only {len(candidates)} {what} examples, fewer than n={n}")
    picked = sorted(random.Random(seed).sample(range(len(candidates)), n))
    return [candidates[i] for i in picked]


def _adjacent(sents, j: int) -> bool:
    """Sentence j follows sentence j - 1 in the text (same or next paragraph, nothing skipped between)."""
    return sents[j][0] - sents[j - 1][0] <= 1


def _passages(sents, context_words: int):
    """Yield (start, end) sentence spans: the shortest run from each start with >= context_words words."""
    i = 0
    while i < len(sents):
        words, j = 0, i
        while j < len(sents) and words < context_words and (j == i or _adjacent(sents, j)):
            words += _nwords(sents[j][1])
            j += 1
        if words < context_words:
            if j >= len(sents):
                return
            i = j               # a skipped paragraph (heading, signature) lies between: restart after it
            continue
        if words <= 2 * context_words:
            accepted = yield i, j
            if accepted:
                i = j
                continue
        i += 1


# --------------------------------------------------------------------------- last word


def last_word_task(text: str | None = None, n: int = 100, context_words: int = 50,
                   seed: int = 0) -> list[LastWordExample]:
    """`n` LAMBADA-style examples from `text` (default: the bundled evaluation novel).

    Example:
        >>> ex = last_word_task(n=3)                                # doctest: +SKIP
        >>> ex[0].context[-40:], ex[0].target                       # doctest: +SKIP
    """
    n, context_words = check_int("n", n, 1), check_int("context_words", context_words, 1)
    sents = _sentences(text)
    found = []
    gen = _passages(sents, context_words)
    try:
        span = next(gen)
        while True:
            ex = _last_word(_join(sents[span[0]:span[1]]))
            if ex is not None:
                found.append(ex)
            span = gen.send(ex is not None)
    except StopIteration:
        pass
    return _draw(found, n, seed, "last-word")


def _last_word(passage: str) -> LastWordExample | None:
    last = passage.split()[-1]
    m = _TARGET.fullmatch(last)
    if m is None:
        return None
    word = m.group(1)
    context = passage[:len(passage) - len(last) + m.start(1)].rstrip()
    if word.lower() in STOPWORDS or not context:
        return None
    if word.lower() not in {w.lower() for w in _WORD.findall(context)}:
        return None
    return LastWordExample(context, word)


def last_word_scores(params, tok, examples, batch_size: int = 8, max_length: int | None = None,
                     gates=None) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [n] log p(" " + target | context), bool [n] target is the greedy continuation).

    Example:
        >>> import jax, jaxprune as jp
        >>> tok = jp.data.CharTokenizer(32)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> lp, ok = last_word_scores(jp.init(cfg, jax.random.key(0)), tok, [LastWordExample("a cat", "cat")])
        >>> lp.shape, ok.shape
        ((1,), (1,))
    """
    examples = _check_examples(examples, LastWordExample)
    _check_tokenizer(tok, decode=False)
    pairs = [encode_pair(tok, e.context, " " + e.target) for e in examples]
    return score_pairs(params, pairs, batch_size, max_length, gates)


def last_word_accuracy(params, tok, examples, batch_size: int = 8, max_length: int | None = None,
                       gates=None) -> float:
    """Share of examples whose target is the model's greedy continuation (lm-eval's lambada `acc`).

    Example:
        >>> params, tok = jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m")   # doctest: +SKIP
        >>> last_word_accuracy(params, tok, last_word_task(n=100))                  # doctest: +SKIP
    """
    return float(last_word_scores(params, tok, examples, batch_size, max_length, gates)[1].mean())


def _check_examples(examples, kind):
    examples = list(examples)
    if not examples:
        raise InvalidArgumentError("examples must be a non-empty list")
    for i, e in enumerate(examples):
        if not isinstance(e, kind):
            raise InvalidArgumentError(f"example {i} must be a {kind.__name__}, got {type(e).__name__}")
    return examples


# --------------------------------------------------------------------------- next sentence


def continuation_task(text: str | None = None, n: int = 100, n_choices: int = 4, context_sentences: int = 3,
                      min_words: int = 8, max_words: int = 40, seed: int = 0) -> list[ContinuationExample]:
    """`n` HellaSwag-style next-sentence examples with `n_choices` choices each.

    Example:
        >>> ex = continuation_task(n=2, seed=1)
        >>> len(ex), len(ex[0].choices)
        (2, 4)
    """
    n = check_int("n", n, 1)
    n_choices = check_int("n_choices", n_choices, 2)
    c = check_int("context_sentences", context_sentences, 1)
    min_words = check_int("min_words", min_words, 1)
    max_words = check_int("max_words", max_words, min_words)
    sents = _sentences(text)
    ok = [min_words <= _nwords(s) <= max_words for _, s in sents]
    windows, i = [], 0
    while i + c < len(sents):
        t = i + c
        if ok[t] and sents[t][0] == sents[t - 1][0] and all(_adjacent(sents, j) for j in range(i + 1, t)):
            windows.append(t)
            i = t + 1
        else:
            i += 1
    by_len: dict[int, list[int]] = {}
    for j, (_, s) in enumerate(sents):
        if ok[j]:
            by_len.setdefault(_nwords(s), []).append(j)
    truths = _draw(windows, n, seed, "next-sentence")
    rng = random.Random(f"{seed}-choices")
    out = []
    for t in truths:
        truth = sents[t][1]
        distractors = _distractors(sents, by_len, t, c + 1, n_choices - 1, rng)
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [truth] + distractors[label:]
        out.append(ContinuationExample(_join(sents[t - c:t]), tuple(choices), label))
    return out


def _distractors(sents, by_len, t, gap, k, rng) -> list[str]:
    truth = sents[t][1]
    L = _nwords(truth)
    tol = max(2, round(0.2 * L))
    while True:
        pool = sorted({sents[j][1] for m in range(L - tol, L + tol + 1) for j in by_len.get(m, ())
                       if abs(j - t) > gap and sents[j][1] != truth})
        if len(pool) >= k:
            return rng.sample(pool, k)
        if tol > 4 * max(L, 1) + len(sents):
            raise DataError(f"too few distinct sentences for {k} distractors")
        tol *= 2


def choice_scores(params, tok, examples, batch_size: int = 8, max_length: int | None = None,
                  gates=None) -> dict[str, np.ndarray]:
    """Per-choice "logprob" (float64 [n, k], of " " + choice after the context), "chars" and "tokens" counts.

    Example:
        >>> import jax, jaxprune as jp
        >>> tok = jp.data.CharTokenizer(32)
        >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=1, num_attention_heads=2)
        >>> ex = [ContinuationExample("It rained.", ("Then sun.", "A cat sat."), 0)]
        >>> choice_scores(jp.init(cfg, jax.random.key(0)), tok, ex)["logprob"].shape
        (1, 2)
    """
    examples = _check_examples(examples, ContinuationExample)
    _check_tokenizer(tok, decode=False)
    k = len(examples[0].choices)
    for i, e in enumerate(examples):
        if len(e.choices) != k or not 0 <= e.label < k:
            raise InvalidArgumentError(f"example {i}: every example needs {k} choices and a label in [0, {k})")
    pairs = [encode_pair(tok, e.context, " " + ch) for e in examples for ch in e.choices]
    lp, _ = score_pairs(params, pairs, batch_size, max_length, gates)
    return {"logprob": lp.reshape(len(examples), k),
            "chars": np.array([[len(ch) for ch in e.choices] for e in examples], np.float64),
            "tokens": np.array([len(p[1]) for p in pairs], np.float64).reshape(len(examples), k)}


def continuation_accuracy(params, tok, examples, normalize: str | None = "chars", batch_size: int = 8,
                          max_length: int | None = None, gates=None) -> float:
    """Share of examples whose true sentence has the best (length-normalised) loglikelihood.

    `normalize`: "chars" (lm-eval's acc_norm: loglikelihood / characters of the
    choice), "tokens" (per token), or None (raw loglikelihood, lm-eval's acc).

    Example:
        >>> params, tok = jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m")     # doctest: +SKIP
        >>> continuation_accuracy(params, tok, continuation_task(n=100))              # doctest: +SKIP
    """
    if normalize not in ("chars", "tokens", None):
        raise InvalidArgumentError(f"normalize must be 'chars', 'tokens' or None, got {normalize!r}")
    s = choice_scores(params, tok, examples, batch_size, max_length, gates)
    score = s["logprob"] if normalize is None else s["logprob"] / np.maximum(s[normalize], 1)
    labels = np.array([e.label for e in examples])
    return float((score.argmax(axis=1) == labels).mean())


# --------------------------------------------------------------------------- generation prompts


def generation_task(text: str | None = None, n: int = 16, context_words: int = 64, reference_words: int = 24,
                    seed: int = 0) -> list[GenerationExample]:
    """`n` (prompt passage, following `reference_words` words) pairs for generation metrics.

    Example:
        >>> ex = generation_task(n=2, reference_words=8)
        >>> [len(e.reference.split()) for e in ex]
        [8, 8]
    """
    n, context_words = check_int("n", n, 1), check_int("context_words", context_words, 1)
    reference_words = check_int("reference_words", reference_words, 1)
    sents = _sentences(text)
    found = []
    gen = _passages(sents, context_words)
    try:
        span = next(gen)
        while True:
            i, j = span
            words, k = [], j
            while k < len(sents) and sents[k][0] == sents[j - 1][0] and len(words) < reference_words:
                words += sents[k][1].split()
                k += 1
            ok = len(words) >= reference_words
            if ok:
                found.append(GenerationExample(_join(sents[i:j]), " ".join(words[:reference_words])))
            span = gen.send(ok)
    except StopIteration:
        pass
    return _draw(found, n, seed, "generation")


# --------------------------------------------------------------------------- lm-eval export


def write_lm_eval_task(examples, directory: str, name: str) -> str:
    """Write `examples` as `{name}.jsonl` + `{name}.yaml` (an lm-eval task) in `directory`; the YAML's path.

    Last-word examples become a `loglikelihood` task (metrics acc, perplexity),
    next-sentence examples a `multiple_choice` task (acc, acc_norm); run them with
    `lm_eval.tasks.TaskManager(include_path=directory)`.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> os.path.basename(write_lm_eval_task([LastWordExample("a cat", "cat")], d, "lw"))
        'lw.yaml'
    """
    examples = list(examples)
    if not examples or not (all(isinstance(e, LastWordExample) for e in examples)
                            or all(isinstance(e, ContinuationExample) for e in examples)):
        raise InvalidArgumentError("examples must be a non-empty list of LastWordExample or of ContinuationExample")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise InvalidArgumentError(f"task name must be letters, digits, _ . -; got {name!r}")
    os.makedirs(directory, exist_ok=True)
    data = os.path.abspath(os.path.join(directory, f"{name}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        for e in examples:
            row = dataclasses.asdict(e)
            if "choices" in row:
                row["choices"] = list(row["choices"])
            f.write(json.dumps(row) + "\n")
    if isinstance(examples[0], LastWordExample):
        body = ['output_type: loglikelihood', 'doc_to_text: "{{context}}"', 'doc_to_target: "{{target}}"',
                'metric_list:', '  - metric: acc', '    aggregation: mean', '    higher_is_better: true',
                '  - metric: perplexity', '    aggregation: perplexity', '    higher_is_better: false']
    else:
        body = ['output_type: multiple_choice', 'doc_to_text: "{{context}}"', 'doc_to_choice: choices',
                'doc_to_target: label',
                'metric_list:', '  - metric: acc', '    aggregation: mean', '    higher_is_better: true',
                '  - metric: acc_norm', '    aggregation: mean', '    higher_is_better: true']
    yaml = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
            f"    test: {json.dumps(data)}", "test_split: test", *body, "metadata:", "  version: 1.0"]
    path = os.path.join(directory, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(yaml) + "\n")
    return path
