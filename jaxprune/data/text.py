"""Text -> token windows, bundled public-domain text, and `datasets` integration.

Protocols (pinned, so figures stay comparable):

* **evaluation** (`eval_windows`): the text is tokenized as one string with no
  special tokens, cut into consecutive non-overlapping windows of `seqlen`
  tokens (the tail that does not fill a window is dropped); no BOS is inserted.
* **calibration** (`calibration_windows`): each text is split into paragraphs on
  blank lines, empty paragraphs dropped, all paragraphs joined with ``"\\n\\n"``
  and tokenized as one string; then `n` windows start at offsets drawn with
  Python's `random.Random(seed).randint(0, len - seqlen - 1)` (the sampling rule
  of the Wanda/SparseGPT reference code).

Example:
    >>> import jaxprune as jp
    >>> tok = jp.tokenizer("smollm2-135m")                                      # doctest: +SKIP
    >>> ev = jp.eval_windows(tok, jp.bundled_text("prideprejudice"), seqlen=512)  # doctest: +SKIP
    >>> ev.shape                                                                # doctest: +SKIP
    (332, 512)
"""

from __future__ import annotations

import gzip
import os
import random
from importlib import resources

import numpy as np

from jaxprune.errors import DataError, InvalidArgumentError

BUNDLED_TEXTS = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
CALIBRATION_TEXTS = ("emma", "mansfieldpark")
EVALUATION_TEXT = "prideprejudice"
_PLAIN_TEXT = (".txt", ".gz", ".md", "")


def bundled_text(name: str) -> str:
    """One of the bundled public-domain novels (see `BUNDLED_TEXTS`) as a string."""
    if name not in BUNDLED_TEXTS:
        raise InvalidArgumentError(f"unknown bundled text {name!r}; choose from {list(BUNDLED_TEXTS)}")
    data = resources.files("jaxprune.data").joinpath("texts", f"{name}.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def read_text(source: str, split: str = "train", field: str = "text") -> str:
    """Text from a bundled name, a local file (.txt or .gz), or a `datasets` source.

    A `datasets` source is a local data file (.json/.jsonl/.csv/.parquet) or a hub
    dataset name (`"wikitext:wikitext-2-raw-v1"` selects a config) where a network
    exists; rows of column `field` are joined with blank lines.
    """
    if source in BUNDLED_TEXTS:
        return bundled_text(source)
    if os.path.isfile(source) and os.path.splitext(source)[1] in _PLAIN_TEXT:
        opener = gzip.open if source.endswith(".gz") else open
        try:
            with opener(source, "rt", encoding="utf-8") as f:
                return f.read()
        except (UnicodeDecodeError, OSError) as e:
            raise DataError(f"{source}: not readable as UTF-8 text ({e})") from None
    return _from_datasets(source, split, field)


def _from_datasets(source: str, split: str, field: str) -> str:
    import datasets

    kinds = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
    ext = os.path.splitext(source)[1]
    try:
        if os.path.isfile(source):
            if ext not in kinds:
                raise DataError(f"{source}: unsupported text file type {ext!r} (use .txt, .gz, .json, .jsonl, .csv, .parquet)")
            ds = datasets.load_dataset(kinds[ext], data_files=source, split=split)
        elif os.path.exists(source):
            raise DataError(f"{source}: is a directory; pass a text or data file")
        else:
            name, _, config = source.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{source!r}: not a local file, and `datasets` could not load it "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if field not in ds.column_names:
        raise DataError(f"{source!r}: no column {field!r} (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds[field] if t)


def _check_seqlen(seqlen):
    if not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
        raise InvalidArgumentError(f"seqlen must be an integer >= 2, got {seqlen!r}")


def eval_windows(tok, text: str, seqlen: int = 512, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows of the whole tokenized text: int32 [n, seqlen].

    Example:
        >>> ev = eval_windows(tok, text, seqlen=512, max_windows=64)   # doctest: +SKIP
    """
    _check_seqlen(seqlen)
    if not isinstance(text, str):
        raise InvalidArgumentError(f"text must be a string, got {type(text).__name__}")
    ids = np.asarray(tok.encode(text), dtype=np.int32)
    n = len(ids) // seqlen
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, int(max_windows))
    return ids[: n * seqlen].reshape(n, seqlen)


def paragraphs_joined(texts) -> str:
    """All non-empty paragraphs (split on blank lines) of `texts`, joined with blank lines."""
    if isinstance(texts, str):
        texts = [texts]
    parts = []
    for t in texts:
        if not isinstance(t, str):
            raise InvalidArgumentError(f"calibration texts must be strings, got {type(t).__name__}")
        parts += [p for p in t.split("\n\n") if p]
    return "\n\n".join(parts)


def calibration_windows(tok, texts, n: int = 128, seqlen: int = 2048, seed: int = 0) -> np.ndarray:
    """`n` random windows of `seqlen` tokens from `texts` (str or list of str): int32 [n, seqlen].

    Example:
        >>> calib = calibration_windows(tok, [emma, mansfield], n=32, seqlen=512, seed=0)  # doctest: +SKIP
    """
    _check_seqlen(seqlen)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidArgumentError(f"n must be a positive integer, got {n!r}")
    joined = paragraphs_joined(texts)
    if not joined.strip():
        raise DataError("calibration text is empty")
    ids = tok.encode(joined)
    if len(ids) < seqlen + 2:
        raise DataError(f"calibration text has {len(ids)} tokens; need at least seqlen + 2 = {seqlen + 2}")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n)]
    arr = np.asarray(ids, dtype=np.int32)
    return np.stack([arr[s:s + seqlen] for s in starts])
