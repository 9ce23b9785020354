"""Tokenizers from `tokenizer.json` or from a GGUF vocabulary.

`encode` never adds special tokens: evaluation and calibration tokenize text as
one plain string, as the pinned perplexity protocol requires.

Example:
    >>> tok = load_tokenizer("smollm2-135m")          # doctest: +SKIP
    >>> tok.decode(tok.encode("It is a truth"))       # doctest: +SKIP
    'It is a truth'
"""

from __future__ import annotations

import os

from jaxprune.errors import CheckpointError


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with jaxprune's conventions."""

    def __init__(self, backend, bos_token_id=None, eos_token_id=None, source=""):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.source = source

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as one string, no special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self):
        return f"Tokenizer({self.vocab_size} tokens from {self.source})"


def from_gguf(path: str) -> Tokenizer:
    """Byte-level BPE tokenizer built from a GGUF file's vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    from jaxprune.io.gguf import gguf_vocab

    v = gguf_vocab(path)
    vocab = {t: i for i, t in enumerate(v["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in v["merges"]]
    backend = Backend(models.BPE(vocab, merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=v["add_space_prefix"])
    backend.decoder = decoders.ByteLevel()
    types = v["token_types"] or []
    control = [AddedToken(v["tokens"][i], special=True, normalized=False)
               for i, t in enumerate(types) if t == 3]  # llama.cpp token type CONTROL
    if control:
        backend.add_special_tokens(control)
    return Tokenizer(backend, v["bos_token_id"], v["eos_token_id"], source=path)


MAX_TOKENIZER_BYTES = 256 << 20
MAX_TOKENIZER_DEPTH = 64


def from_directory(directory: str) -> Tokenizer:
    """Tokenizer of a Hugging Face checkpoint directory (its tokenizer.json, bounded in size and
    nesting before `tokenizers` parses it; anything unreadable is a CheckpointError)."""
    from tokenizers import Tokenizer as Backend

    from jaxprune.io.untrusted import inside, json_depth, read_json, short

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no tokenizer.json (jaxprune reads fast-tokenizer files)")
    path = inside(directory, "tokenizer.json")
    try:
        size = os.path.getsize(path)
        if size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{path}: tokenizer.json has {size} bytes (at most {MAX_TOKENIZER_BYTES})")
        with open(path, "rb") as f:
            raw = f.read(min(size, MAX_TOKENIZER_BYTES) + 1)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    depth = json_depth(raw)
    if len(raw) > MAX_TOKENIZER_BYTES or depth > MAX_TOKENIZER_DEPTH:
        raise CheckpointError(f"{path}: unreadable tokenizer (nests {depth} levels deep, at most {MAX_TOKENIZER_DEPTH})")
    try:
        backend = Backend.from_str(raw.decode("utf-8"))
    except BaseException as e:   # tokenizers' Rust panics are BaseExceptions (pyo3 PanicException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"{path}: unreadable tokenizer ({type(e).__name__}: {short(str(e), 200)})") from None
    bos = eos = None
    if os.path.isfile(os.path.join(directory, "config.json")):
        cfg = read_json(inside(directory, "config.json"), "config.json", 4 << 20, 32)
        if isinstance(cfg, dict):
            bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    return Tokenizer(backend, _token_id(bos), _token_id(eos), source=directory)


def _token_id(value):
    """A config's bos/eos id (an int or a list of ints) as written, or None for anything else."""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if isinstance(value, list):
        return value if value and len(value) <= 64 and all(ok(v) for v in value) else None
    return value if ok(value) else None


class CharTokenizer:
    """A toy tokenizer for examples and tests: one token per character, ``ord(c) % vocab_size``
    (``ord(c)`` when `vocab_size` is None); decoding maps id i to the letter ``"a" + i % 26``, so
    it is not an inverse. BOS is 1 and EOS 2, as in many real vocabularies.

    Example:
        >>> tok = CharTokenizer(32)
        >>> tok.encode("ab "), tok.decode([0, 1, 27]), tok.eos_token_id
        ([1, 2, 0], 'abb', 2)
    """

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size if self.vocab_size else ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)
