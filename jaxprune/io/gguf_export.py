"""`save_gguf`: a Llama model's `Params` -> one GGUF file that llama.cpp runs.

Architecture ``llama`` for dense and uniformly compacted models; ``deci`` (llama.cpp's
per-layer ``deci.attention.head_count`` / ``.head_count_kv`` / ``deci.feed_forward_length``
arrays, as NVIDIA's Nemotron-NAS models use) for non-uniform compacted ones
(``config.layer_shapes``). llama.cpp's deci graph needs three exact workarounds (an FFN of
width 1 with zero weights in FFN-free layers, a zero 1-head attention in layer 0 when only
later layers attend, K/V repeated per query head for unequal K/V groups): see
`jaxprune.io.gguf.gguf_layers`. The exact config goes into the ``jaxprune.config`` key
(`jaxprune.io.gguf.CONFIG_KEY`), so `jp.load` of the file undoes them and equals the params.

Tensors: names from the Layout (`jaxprune.io.gguf.gguf_names`), HF's ``[out, in]`` layout, Q/K
rows permuted to llama.cpp's interleaved rotary layout (inverse of
`jaxprune.io.gguf.unpermute_rotary`), 2-D tensors in ``dtype`` (float32, float16 or bfloat16),
norms and other 1-D tensors float32. ``key_length``, ``value_length`` and
``rope.dimension_count`` are always written (head_dim may differ from hidden / heads). RoPE:
linear scaling as metadata, llama3 scaling as the ``rope_freqs.weight`` divisors.

Tokenizer (``tokenizer=``, a jaxprune `Tokenizer`): read from a GGUF file (``tok.source``
ends in ``.gguf``), every ``tokenizer.ggml.*`` field of that file is copied (``pre``
included); otherwise byte-level BPE metadata is built from the ``tokenizers`` backend
(model ``gpt2``, tokens, token types with special added tokens as control, merges, BOS/EOS,
pre-tokenizer ``default``: llama.cpp's own text tokenization may then differ from the
backend's; token ids do not). Fewer tokens than ``vocab_size`` are padded with unused
``[PAD<i>]`` tokens, as llama.cpp's converter does.

The file is written to a temporary sibling, flushed to disk and renamed into place; an
existing file is replaced only with ``overwrite=True``.

Example:
    >>> import os, tempfile, jax, numpy as np, jaxprune as jp
    >>> cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> params = jp.init(cfg, jax.random.key(0))
    >>> path = save_gguf(params, os.path.join(tempfile.mkdtemp(), "tiny.gguf"))
    >>> back = jp.load(path)
    >>> back.config == cfg, all(np.array_equal(a, b) for a, b in
    ...                         zip(jax.tree.leaves(params), jax.tree.leaves(back)))
    (True, True)
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from jaxprune.core.params import Params
from jaxprune.errors import CheckpointError, InvalidArgumentError, UnsupportedModelError
from jaxprune.io.gguf import CONFIG_KEY, gguf_layers, gguf_names

DTYPES = ("float32", "float16", "bfloat16")
_CONTROL, _USER_DEFINED, _UNUSED, _NORMAL = 3, 4, 5, 1  # llama.cpp token types


def _check_params(params) -> None:
    from jaxprune.io.hf import validate_tree
    if not isinstance(params, Params):
        raise InvalidArgumentError(f"save needs jaxprune Params, got {type(params).__name__}")
    cfg = params.config
    if cfg.arch != "llama":
        raise UnsupportedModelError(f"GGUF export writes Llama models (arch 'llama'); got arch {cfg.arch!r}: "
                                    "save it as a Hugging Face directory (format='hf')")
    if cfg.attention_bias or cfg.mlp_bias:
        raise UnsupportedModelError("GGUF export does not write Llama models with attention_bias / mlp_bias")
    try:
        validate_tree(cfg, params.tree, "params")
    except CheckpointError as e:
        raise InvalidArgumentError(str(e)) from None


def dtype_name(dtype, params: Params) -> str:
    """'float32', 'float16' or 'bfloat16' for `dtype` (None: the embedding's dtype if one of those,
    else float32); InvalidArgumentError for anything else."""
    if dtype is None:
        name = np.dtype(params.tree["embed_tokens"]["embedding"].dtype).name
        return name if name in DTYPES else "float32"
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise InvalidArgumentError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


# ----------------------------------------------------------------------------- tokenizer

def _gguf_source_fields(path: str) -> dict:
    """Every ``tokenizer.ggml.*`` field of a GGUF file: key -> (value, type, array item type)."""
    import gguf
    from jaxprune.io.gguf import _reader
    out = {}
    for key, f in _reader(path).fields.items():
        if key.startswith("tokenizer.ggml."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            out[key] = (f.contents(), f.types[0], sub)
    return out


def _find_type(node, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_find_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_find_type(v, kind) for v in node)
    return False


def _backend_fields(tokenizer) -> dict:
    """Byte-level BPE (llama.cpp's ``gpt2`` model) metadata from a `tokenizers` backend."""
    from gguf import GGUFValueType as T
    try:
        spec = json.loads(tokenizer.backend.to_str())
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    except Exception as e:
        raise InvalidArgumentError(f"tokenizer: cannot read its tokenizers backend ({type(e).__name__}: {e})") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _find_type([spec.get("pre_tokenizer"), spec.get("decoder")], "ByteLevel"):
        raise UnsupportedModelError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2'); this one "
                                    f"is {model.get('type')!r} without a ByteLevel pre-tokenizer/decoder")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise UnsupportedModelError("GGUF export: the BPE tokenizer has no merges (llama.cpp requires them)")
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    types = [_NORMAL] * len(tokens)
    for a in spec.get("added_tokens") or []:
        types[a["id"]] = _CONTROL if a.get("special") else _USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", _UNUSED
    out = {"tokenizer.ggml.model": ("gpt2", T.STRING, None), "tokenizer.ggml.pre": ("default", T.STRING, None),
           "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
           "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
           "tokenizer.ggml.merges": (merges, T.ARRAY, T.STRING),
           "tokenizer.ggml.add_bos_token": (False, T.BOOL, None)}  # jaxprune never adds BOS
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if isinstance(value, (list, tuple)):  # several EOS ids: GGUF holds one
            value = value[0] if value else None
        if value is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = (int(value), T.UINT32, None)
    return out


def tokenizer_fields(tokenizer, config) -> dict:
    """GGUF ``tokenizer.ggml.*`` metadata for `tokenizer` (see the module docstring), padded to
    ``config.vocab_size``; with no tokenizer only the config's BOS / EOS ids."""
    from gguf import GGUFValueType as T
    if tokenizer is None:
        fields = {}
    elif not hasattr(tokenizer, "backend"):
        raise InvalidArgumentError(f"tokenizer must be a jaxprune Tokenizer (jp.tokenizer(...)), "
                                   f"got {type(tokenizer).__name__}")
    else:
        source = getattr(tokenizer, "source", "")
        gguf_source = isinstance(source, str) and source.endswith(".gguf") and os.path.isfile(source)
        fields = _gguf_source_fields(source) if gguf_source else _backend_fields(tokenizer)
    for key in ("bos", "eos"):
        value = getattr(config, f"{key}_token_id")
        if f"tokenizer.ggml.{key}_token_id" not in fields and value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = (int(value), T.UINT32, None)
    if "tokenizer.ggml.tokens" in fields:
        tokens = list(fields["tokenizer.ggml.tokens"][0])
        n, V = len(tokens), config.vocab_size
        if n > V:
            raise InvalidArgumentError(f"the tokenizer has {n} tokens, more than the model's vocab_size={V}")
        pads = {"tokenizer.ggml.tokens": [f"[PAD{i}]" for i in range(n, V)],
                "tokenizer.ggml.token_type": [_UNUSED] * (V - n), "tokenizer.ggml.scores": [0.0] * (V - n)}
        for key, extra in pads.items():
            if key in fields and V > n:
                value, vtype, sub = fields[key]
                fields[key] = (list(value) + extra, vtype, sub)
    return fields


# ----------------------------------------------------------------------------- tensors

def _permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows of Q/K `[out, in]` -> llama.cpp's interleaved rows (inverse of unpermute_rotary)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return np.asarray(tree, dtype=np.float32)


def gguf_tensors(params: Params):
    """(GGUF name, float32 array in HF ``[out, in]`` layout) of every tensor the file holds."""
    from jaxprune.io.gguf import _llama3_factors
    from jaxprune.io.names import hf_to_path
    from jaxprune.models.layers import rope_inv_freq

    cfg, tree = params.config, params.tree
    layer_names, top_names = gguf_names(cfg.arch)
    get = lambda hf: (lambda p: _leaf(tree, p).T if p[-1] == "kernel" else _leaf(tree, p))(hf_to_path(hf, cfg.arch))
    rope = cfg.rope
    if rope and rope["rope_type"] == "llama3":
        inv = np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, None), np.float64)
        yield "rope_freqs.weight", _llama3_factors(inv, rope["factor"], rope["low_freq_factor"],
                                                   rope["high_freq_factor"],
                                                   rope["original_max_position_embeddings"]).astype(np.float32)
    for gname, hf in top_names.items():
        if gname == "output" and cfg.tie_word_embeddings:
            continue
        yield f"{gname}.weight", get(f"{hf}.weight")
    D, Dh = cfg.hidden_size, cfg.head_dim
    for i, e in enumerate(gguf_layers(cfg)):
        lp = tree["layers"][i]
        for gname, module in layer_names.items():
            attn = module.startswith("self_attn.") or module == "input_layernorm"
            if (attn and e["attn_placeholder"]) or (not attn and e["ffn_placeholder"]):
                F = e["ffn_dim"]  # placeholders (1 head / width 1): zero weights, unit norms
                w = {"attn_q": (Dh, D), "attn_k": (Dh, D), "attn_v": (Dh, D), "attn_output": (D, Dh),
                     "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}.get(gname)
                yield f"blk.{i}.{gname}.weight", np.zeros(w, np.float32) if w else np.ones(D, np.float32)
                continue
            if attn and "self_attn" not in lp:
                continue  # attention-free layer
            w = get(f"model.layers.{i}.{module}.weight")
            if gname in ("attn_k", "attn_v") and e["kv_groups"]:  # one K/V head per query head
                w = np.repeat(w.reshape(len(e["kv_groups"]), Dh, D), e["kv_groups"], axis=0).reshape(-1, D)
            if gname == "attn_q":
                w = _permute_rotary(w, e["n_heads"])
            elif gname == "attn_k":
                w = _permute_rotary(w, e["n_kv"])
            yield f"blk.{i}.{gname}.weight", np.ascontiguousarray(w)


# ----------------------------------------------------------------------------- the file

def _fill(writer, params: Params, dtype: str, tok_fields: dict) -> None:
    import gguf
    cfg = params.config
    layers = gguf_layers(cfg)
    arch = writer.arch
    per_layer = arch == "deci"
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length([e["ffn_dim"] for e in layers] if per_layer else cfg.intermediate_size)
    writer.add_head_count([e["n_heads"] for e in layers] if per_layer else cfg.num_attention_heads)
    writer.add_head_count_kv([e["n_kv"] for e in layers] if per_layer else cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope
    if rope and rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                          "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    for key, (value, vtype, sub) in tok_fields.items():
        writer.add_key_value(key, value, vtype, sub)
    writer.add_string(CONFIG_KEY, json.dumps(cfg.to_hf(), sort_keys=True))
    for name, w in gguf_tensors(params):
        if w.ndim == 1 or dtype == "float32":
            writer.add_tensor(name, w.astype(np.float32))
        elif dtype == "float16":
            if np.abs(w).max(initial=0.0) > np.finfo(np.float16).max:
                raise InvalidArgumentError(f"{name} holds values beyond float16's range; use dtype='bfloat16'")
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_file(path: str, fill, overwrite: bool = False) -> str:
    """Create file `path` atomically: `fill(tmp)` writes a temporary sibling, which is flushed to
    disk and renamed into place (replacing an existing file only with `overwrite`)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; a GGUF file needs a file path")
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
        os.close(fd)
    except OSError as e:
        raise CheckpointError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        fill(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
        try:
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass  # some file systems cannot fsync a directory
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"writing {path} failed: {e}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_gguf(params: Params, path: str, tokenizer=None, dtype=None, overwrite: bool = False) -> str:
    """Write a Llama model as GGUF (``llama``, or ``deci`` when ``config.layer_shapes`` is set).

    Args:
      params: a Llama model (``config.arch == "llama"``, no biases).
      path: the file to write; an existing one only with `overwrite`.
      tokenizer: a jaxprune `Tokenizer` to include (None: no vocabulary, only BOS / EOS ids;
        `jp.load` reads such a file, llama.cpp needs a vocabulary).
      dtype: "float32", "float16" or "bfloat16" for the 2-D tensors (None: the embedding's dtype
        if one of those, else float32); 1-D tensors stay float32.

    Returns the absolute path. Raises UnsupportedModelError for other families,
    InvalidArgumentError for a bad dtype or tokenizer, CheckpointError when `path` exists or
    cannot be written. Example: see the module docstring.
    """
    import gguf
    _check_params(params)
    name = dtype_name(dtype, params)
    fields = tokenizer_fields(tokenizer, params.config)
    arch = "llama" if params.config.layer_shapes is None else "deci"
    return write_file(path, lambda tmp: _fill(gguf.GGUFWriter(tmp, arch), params, name, fields), overwrite)
