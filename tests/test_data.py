"""Token windows, calibration sampling and text sources."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp


class CharTokenizer:
    """One token per character: makes every window checkable by eye."""

    def encode(self, text):
        return [ord(c) for c in text]


TOK = CharTokenizer()


@given(st.text(alphabet="abcdef \n", min_size=2, max_size=300), st.integers(2, 40))
@settings(max_examples=60, deadline=None)
def test_eval_windows_are_consecutive_and_drop_only_the_tail(text, seqlen):
    ids = TOK.encode(text)
    if len(ids) < seqlen:
        with pytest.raises(jp.DataError, match="fewer than one window"):
            jp.eval_windows(TOK, text, seqlen=seqlen)
        return
    w = jp.eval_windows(TOK, text, seqlen=seqlen)
    assert w.dtype == np.int32 and w.shape == (len(ids) // seqlen, seqlen)
    assert w.ravel().tolist() == ids[: w.size]


def test_calibration_windows_follow_the_reference_sampling_rule():
    emma, mansfield = jp.bundled_text("emma")[:60000], jp.bundled_text("mansfieldpark")[:60000]
    # The reference procedure, written independently:
    docs = []
    for t in (emma, mansfield):
        docs += [p for p in t.split("\n\n") if p]
    ids = TOK.encode("\n\n".join(docs))
    random.seed(0)
    ref = [ids[i:i + 512] for i in (random.randint(0, len(ids) - 512 - 1) for _ in range(32))]
    got = jp.calibration_windows(TOK, [emma, mansfield], n=32, seqlen=512, seed=0)
    assert got.shape == (32, 512) and got.dtype == np.int32
    assert got.tolist() == ref
    assert not np.array_equal(got, jp.calibration_windows(TOK, [emma, mansfield], n=32, seqlen=512, seed=1))


@pytest.mark.parametrize("texts,match", [([""], "empty"), (["\n\n\n\n"], "empty"), (["short text"], "need at least")])
def test_calibration_rejects_empty_or_short_text(texts, match):
    with pytest.raises(jp.DataError, match=match):
        jp.calibration_windows(TOK, texts, n=4, seqlen=64)


@pytest.mark.parametrize("kw,match", [(dict(n=0), "n must be"), (dict(seqlen=1), "seqlen must be"),
                                      (dict(seqlen=3.5), "seqlen must be")])
def test_calibration_rejects_bad_arguments(kw, match):
    with pytest.raises(jp.InvalidArgumentError, match=match):
        jp.calibration_windows(TOK, ["x" * 1000], **{"n": 4, "seqlen": 64, **kw})


def test_bundled_texts_and_unknown_name():
    assert jp.bundled_text("prideprejudice").lstrip().startswith("PRIDE AND PREJUDICE")
    with pytest.raises(jp.InvalidArgumentError, match="unknown bundled text"):
        jp.bundled_text("ulysses")


def test_read_text_from_files_and_datasets(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    assert jp.read_text(str(tmp_path / "a.txt")) == "plain text"
    rows = [{"text": "first row"}, {"text": ""}, {"text": "second row"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert jp.read_text(str(tmp_path / "d.jsonl")) == "first row\n\nsecond row"
    with pytest.raises(jp.DataError, match="no column 'body'"):
        jp.read_text(str(tmp_path / "d.jsonl"), field="body")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(jp.DataError, match="UTF-8"):
        jp.read_text(str(tmp_path / "bad.txt"))


def test_read_text_from_unreachable_hub_fails_clearly():
    with pytest.raises(jp.DataError, match="could not load it"):
        jp.read_text("no-such-owner-jaxprune/no-such-dataset")
