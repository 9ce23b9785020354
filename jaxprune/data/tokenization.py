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


def from_directory(directory: str) -> Tokenizer:
    """Tokenizer of a Hugging Face checkpoint directory (its tokenizer.json)."""
    import json

    from tokenizers import Tokenizer as Backend

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no tokenizer.json (jaxprune reads fast-tokenizer files)")
    try:
        backend = Backend.from_file(path)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable tokenizer ({e})") from None
    bos = eos = None
    cfg_path = os.path.join(directory, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    return Tokenizer(backend, bos, eos, source=directory)
