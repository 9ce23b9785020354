"""Every invalid input in docs/errors.md is rejected with the documented error type and message.

One case per row of the table in docs/errors.md (the ids must match: see
`test_the_table_lists_exactly_these_cases`). Each case is a small call on a tiny random
Llama (`jp.init`, no torch), a char-level tokenizer and a few directories written once per
module; CLI cases run `jaxprune.cli.main` in-process and expect exit status 2 with the
message on stderr, before any model is loaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune.sparsity import masks as M
from jaxprune.cli import main
from jaxprune.errors import CheckpointError, DataError, InvalidArgumentError, UnsupportedModelError
from jaxprune.oneshot.streaming import prune_streaming
from jaxprune.data.tokenization import Tokenizer

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "errors.md")


class CLIExit(Exception):
    """`jaxprune ...` ended with a non-zero status; the message is its stderr."""

    def __init__(self, code, stderr):
        super().__init__(stderr)
        self.code = code


def char_tokenizer() -> Tokenizer:
    """One token per printable ASCII character (ids 0..62), [UNK] = 63: 64 ids in all."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers
    vocab = {chr(i): i - 32 for i in range(32, 95)}
    vocab["[UNK]"] = 63
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return Tokenizer(backend, source="chars")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    params = jp.init(cfg, jax.random.key(0))
    other = jp.init(jp.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=32), jax.random.key(1))
    masks = jp.magnitude(params, 0.5)
    tok = char_tokenizer()
    afile = root / "file.txt"
    afile.write_text("a plain file, not a directory")
    return SimpleNamespace(
        params=params, other=other, masks=masks, tok=tok, root=str(root), file=str(afile),
        calib=np.random.RandomState(0).randint(0, 64, (2, 16)).astype(np.int32),
        hf=jp.save(params, str(root / "hf"), masks=masks, tokenizer=tok),
        ck=jp.save_checkpoint(str(root / "ck"), params, masks=masks),
        comp=jp.save_compressed(jp.apply_masks(params, masks), str(root / "comp"), masks=masks)["path"],
    )


# ----------------------------------------------------------------------------- helpers

def with_weight(e, value):
    """params with one weight of layer 0's up_proj set to `value` (NaN/Inf)."""
    tree = jax.tree.map(lambda x: x, e.params.tree)
    k = tree["layers"][0]["mlp"]["up_proj"]["kernel"]
    tree["layers"][0]["mlp"]["up_proj"]["kernel"] = k.at[0, 0].set(value)
    return e.params.replace(tree)


def without(tree_params, key):
    return tree_params.replace({k: v for k, v in tree_params.tree.items() if k != key})


def with_extra(tree_params):
    return tree_params.replace({**tree_params.tree, "extra": jnp.ones(3, bool)})


def transposed_mask(e):
    """masks with layer 0's up_proj mask [32, 64] transposed to [64, 32]."""
    tree = jax.tree.map(lambda x: x, e.masks.tree)
    tree["layers"][0]["mlp"]["up_proj"]["kernel"] = tree["layers"][0]["mlp"]["up_proj"]["kernel"].T
    return e.masks.replace(tree)


def float_masks(e):
    return jax.tree.map(lambda m: m.astype(jnp.float32), e.masks)


def keep_masked_step(masks, e):
    tx = optax.chain(optax.sgd(0.1), jp.keep_masked(masks))
    return tx.update(e.params, tx.init(e.params), e.params)


def copy_dir(src, tmp, name="copy"):
    dst = os.path.join(str(tmp), name)
    shutil.copytree(src, dst)
    return dst


def truncated(src, tmp, *files):
    """A copy of directory `src` with `files` (default: every file under it) cut to half their size."""
    dst = copy_dir(src, tmp)
    paths = [os.path.join(dst, f) for f in files] or [
        os.path.join(d, f) for d, _, fs in os.walk(dst) for f in fs]
    for p in paths:
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
    return dst


def removed(src, tmp, name):
    dst = copy_dir(src, tmp)
    p = os.path.join(dst, name)
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return dst


def cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:   # argparse rejects the command line
            code = e.code
    if code:
        raise CLIExit(code, err.getvalue())
    return code


def opt_params():
    """A 1-layer OPT (a family GGUF export does not write)."""
    return jp.init(jp.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=32), jax.random.key(0))


def report_dir(tmp, text):
    d = os.path.join(str(tmp), "run")
    os.makedirs(d)
    with open(os.path.join(d, "report.json"), "w") as f:
        f.write(text)
    return d


# ----------------------------------------------------------------------------- the cases
# (id, call(env, tmp_path), error type, regex on the message)

CASES = [
    # sparsity
    ("sparsity-negative", lambda e, t: jp.magnitude(e.params, sparsity=-0.1),
     InvalidArgumentError, r"sparsity must lie in \[0, 1\), got -0\.1"),
    ("sparsity-one", lambda e, t: jp.wanda(e.params, e.calib, sparsity=1.0),
     InvalidArgumentError, r"sparsity must lie in \[0, 1\), got 1\.0"),
    ("sparsity-above-one", lambda e, t: jp.wanda(e.params, e.calib, sparsity=1.2),
     InvalidArgumentError, r"sparsity must lie in \[0, 1\), got 1\.2"),
    ("sparsity-nan", lambda e, t: jp.sparsegpt(e.params, e.calib, sparsity=float("nan")),
     InvalidArgumentError, r"sparsity must lie in \[0, 1\), got nan"),
    ("sparsity-not-a-number", lambda e, t: jp.magnitude(e.params, sparsity="0.5"),
     InvalidArgumentError, r"sparsity must be a number in \[0, 1\), got '0\.5'"),
    ("sparsity-none", lambda e, t: M.per_layer_mask(jnp.ones((4, 4)), None),
     InvalidArgumentError, r"sparsity must be a number in \[0, 1\), got None"),
    ("per-layer-sparsity-count", lambda e, t: jp.wanda(e.params, e.calib, per_layer_sparsity=[0.5]),
     InvalidArgumentError, r"per-layer sparsities have 1 entries for 2 layers"),
    ("per-layer-sparsity-not-numbers", lambda e, t: jp.wanda(e.params, e.calib, per_layer_sparsity=["a", "b"]),
     InvalidArgumentError, r"sparsity must be a number in \[0, 1\), got 'a'"),
    # N:M patterns
    ("pattern-n-equals-m", lambda e, t: jp.magnitude(e.params, pattern="4:4"),
     InvalidArgumentError, r"N:M pattern needs 0 < N < M, got 4:4"),
    ("pattern-n-above-m", lambda e, t: jp.wanda(e.params, e.calib, pattern="5:4"),
     InvalidArgumentError, r"N:M pattern needs 0 < N < M, got 5:4"),
    ("pattern-n-zero", lambda e, t: jp.sparsegpt(e.params, e.calib, pattern="0:4"),
     InvalidArgumentError, r"N:M pattern needs 0 < N < M, got 0:4"),
    ("pattern-malformed", lambda e, t: jp.magnitude(e.params, pattern="2-4"),
     InvalidArgumentError, r"pattern must be 'unstructured' or 'N:M' like '2:4', got '2-4'"),
    ("pattern-tuple-not-integers", lambda e, t: M.parse_pattern((2.0, 4)),
     InvalidArgumentError, r"N:M pattern tuple needs two integers, got \(2\.0, 4\)"),
    ("pattern-m-not-dividing-inputs", lambda e, t: jp.magnitude(e.params, pattern="2:3"),
     InvalidArgumentError, r"N:M pattern 2:3: M=3 does not divide the input size \d+ of \['layers'\]"),
    ("nm-mask-m-not-dividing", lambda e, t: M.nm_mask(jnp.ones((6, 2)), 2, 4),
     InvalidArgumentError, r"M=4 does not divide the input size 6"),
    ("nm-mask-m-zero", lambda e, t: M.nm_mask(jnp.ones((6, 2)), 1, 0),
     InvalidArgumentError, r"N:M pattern needs 0 < N < M, got 1:0"),
    ("sparsegpt-blocksize-not-multiple-of-m", lambda e, t: jp.sparsegpt(e.params, e.calib, pattern="2:4", blocksize=6),
     InvalidArgumentError, r"blocksize=6 must be a multiple of M=4"),
    # other arguments
    ("scope-unknown", lambda e, t: jp.magnitude(e.params, scope="column"),
     InvalidArgumentError, r"scope must be one of \('row', 'layer', 'global'\), got 'column'"),
    ("select-scope-global", lambda e, t: M.select(jnp.ones((4, 4)), 0.5, scope="global"),
     InvalidArgumentError, r"scope must be 'row' or 'layer' \(for 'global' use global_masks\), got 'global'"),
    ("sparsegpt-percdamp", lambda e, t: jp.sparsegpt(e.params, e.calib, percdamp=1.5),
     InvalidArgumentError, r"percdamp must lie in \[0, 1\), got 1\.5"),
    ("batch-size-zero", lambda e, t: jp.wanda(e.params, e.calib, batch_size=0),
     InvalidArgumentError, r"batch_size must be a positive integer, got 0"),
    ("params-not-a-model", lambda e, t: jp.magnitude([1.0, 2.0], 0.5),
     InvalidArgumentError, r"expected jaxprune Params .* got list"),
    ("prunable-selects-nothing", lambda e, t: jp.magnitude(e.params, prunable=lambda path: False),
     InvalidArgumentError, r"the prunable predicate selects no 2-D kernel"),
    # weights and scores
    ("weights-nan-magnitude", lambda e, t: jp.magnitude(with_weight(e, np.nan), 0.5),
     InvalidArgumentError, r"\['layers'\]\[0\]\['mlp'\]\['up_proj'\]\['kernel'\] holds NaN or Inf weights"),
    ("weights-inf-wanda", lambda e, t: jp.wanda(with_weight(e, np.inf), e.calib, 0.5),
     InvalidArgumentError, r"\['layers'\]\[0\]\['mlp'\]\['up_proj'\]\['kernel'\] holds NaN or Inf weights"),
    ("weights-nan-sparsegpt", lambda e, t: jp.sparsegpt(with_weight(e, np.nan), e.calib, 0.5),
     InvalidArgumentError, r"\['layers'\]\[0\]\['mlp'\]\['up_proj'\]\['kernel'\] holds NaN or Inf weights"),
    ("scores-not-numbers", lambda e, t: M.per_layer_mask(np.array(["a", "b"]), 0.5),
     InvalidArgumentError, r"scores must be an array of real numbers, got dtype <U1"),
    ("scores-scalar", lambda e, t: M.per_output_mask(np.float32(1.0), 0.5),
     InvalidArgumentError, r"scores need at least 1 axis\(es\), got shape \(\)"),
    # calibration and evaluation data
    ("calib-text-empty", lambda e, t: jp.calibration_windows(e.tok, ["", "\n\n  \n\n"], n=2, seqlen=8),
     DataError, r"calibration text is empty"),
    ("calib-text-too-short", lambda e, t: jp.calibration_windows(e.tok, "HELLO", n=2, seqlen=8),
     DataError, r"calibration text has 5 tokens; need at least seqlen \+ 2 = 10"),
    ("calib-text-not-string", lambda e, t: jp.calibration_windows(e.tok, [b"bytes"], n=2, seqlen=8),
     InvalidArgumentError, r"calibration texts must be strings, got bytes"),
    ("calib-n-zero", lambda e, t: jp.calibration_windows(e.tok, "HELLO " * 10, n=0, seqlen=8),
     InvalidArgumentError, r"n must be a positive integer, got 0"),
    ("calib-seqlen-below-two", lambda e, t: jp.calibration_windows(e.tok, "HELLO " * 10, n=2, seqlen=1),
     InvalidArgumentError, r"seqlen must be an integer >= 2, got 1"),
    ("calib-seqlen-beyond-context", lambda e, t: jp.wanda(e.params, np.zeros((1, 40), np.int32)),
     DataError, r"calibration seqlen 40 exceeds the model's context \(32\)"),
    ("calib-float-dtype", lambda e, t: jp.wanda(e.params, e.calib.astype(np.float32)),
     DataError, r"calibration tokens must be integer ids, got float32"),
    ("calib-rank-1", lambda e, t: jp.wanda(e.params, e.calib[0]),
     DataError, r"calibration tokens must be an int array \[n >= 1, seqlen >= 2\], got shape \(16,\)"),
    ("calib-rank-3", lambda e, t: jp.sparsegpt(e.params, e.calib[None]),
     DataError, r"calibration tokens must be an int array \[n >= 1, seqlen >= 2\], got shape \(1, 2, 16\)"),
    ("calib-ragged", lambda e, t: jp.wanda(e.params, [[0, 1, 2], [0, 1]]),
     DataError, r"calibration tokens must be an int array \[n, seqlen\], got list"),
    ("calib-no-windows", lambda e, t: jp.wanda(e.params, e.calib[:0]),
     DataError, r"got shape \(0, 16\)"),
    ("calib-token-out-of-vocab", lambda e, t: jp.wanda(e.params, e.calib + 64),
     DataError, r"calibration token ids must lie in \[0, 64\), got \[64, \d+\]"),
    ("calib-stats-malformed", lambda e, t: jp.wanda(e.params, {"sums": {}}),
     InvalidArgumentError, r"precomputed statistics must be \{'sums': \{\.\.\.\}, 'count': n\}"),
    ("eval-text-too-short", lambda e, t: jp.eval_windows(e.tok, "HI", seqlen=8),
     DataError, r"the text has 2 tokens, fewer than one window of seqlen=8"),
    ("eval-seqlen-beyond-context", lambda e, t: jp.perplexity(e.params, np.zeros((1, 40), np.int32)),
     InvalidArgumentError, r"windows of 40 tokens exceed the model's context \(max_position_embeddings=32\)"),
    ("bundled-text-unknown", lambda e, t: jp.bundled_text("ulysses"),
     InvalidArgumentError, r"unknown bundled text 'ulysses'; choose from \["),
    # masks that do not match the params
    ("masks-missing-key", lambda e, t: jp.apply_masks(e.params, without(e.masks, "norm")),
     InvalidArgumentError, r"masks do not match params: paths only in params \[.*'norm'"),
    ("masks-extra-key", lambda e, t: jp.apply_masks(e.params, with_extra(e.masks)),
     InvalidArgumentError, r"paths only in params \[\], only in masks \[.*'extra'"),
    ("masks-wrong-shape", lambda e, t: jp.apply_masks(e.params, transposed_mask(e)),
     InvalidArgumentError, r"mask \['layers'\]\[0\]\['mlp'\]\['up_proj'\]\['kernel'\] has shape \(64, 32\), "
                           r"params have \(32, 64\)"),
    ("masks-not-bool", lambda e, t: jp.apply_masks(e.params, float_masks(e)),
     InvalidArgumentError, r"mask \[.*\] must be boolean \(True = keep\), got .*float32"),
    ("masks-plain-dict", lambda e, t: jp.apply_masks(e.params, e.masks.tree),
     InvalidArgumentError, r"the containers differ \(dict masks for Params params\)"),
    ("keep-masked-missing-key", lambda e, t: keep_masked_step(without(e.masks, "norm"), e),
     InvalidArgumentError, r"keep_masked: the masks do not have the structure of the updates .*only in params"),
    ("keep-masked-wrong-shape", lambda e, t: keep_masked_step(transposed_mask(e), e),
     InvalidArgumentError, r"keep_masked: .*\['up_proj'\]\['kernel'\] has shape \(64, 32\)"),
    ("keep-masked-not-bool", lambda e, t: jp.keep_masked(float_masks(e)),
     InvalidArgumentError, r"keep_masked: mask \[.*\] must be boolean \(True = keep\)"),
    # distillation (jp.distill)
    ("distill-no-key", lambda e, t: jp.distill(e.params, e.params, e.calib, steps=2),
     InvalidArgumentError, r"distill draws batches \(and LoRA adapters\): pass key=jax.random.key\(seed\)"),
    ("distill-vocab-mismatch",
     lambda e, t: jp.distill(e.params.replace(config=type(e.params.config)(**{**vars(e.params.config), "vocab_size": 80})),
                             e.params, e.calib, key=jax.random.key(0)),
     InvalidArgumentError, r"student and teacher vocabularies differ: 80 vs 64 tokens"),
    ("distill-hidden-width-mismatch",
     lambda e, t: jp.distill(e.other, e.params, e.calib, key=jax.random.key(0), hidden_weight=1.0),
     InvalidArgumentError, r"the hidden-state loss needs equal widths: student hidden size 16, teacher 32"),
    ("distill-steps-zero", lambda e, t: jp.distill(e.params, e.params, e.calib, key=jax.random.key(0), steps=0),
     InvalidArgumentError, r"steps must be a positive integer, got 0"),
    ("save-masks-wrong-shape", lambda e, t: jp.save(e.params, str(t / "out"), masks=transposed_mask(e)),
     InvalidArgumentError, r"masks must be shaped like params .*has shape \(64, 32\)"),
    ("save-masks-not-bool", lambda e, t: jp.save(e.params, str(t / "out"), masks=float_masks(e)),
     InvalidArgumentError, r"masks must be shaped like params .*must be boolean"),
    ("save-compressed-masks-missing-key",
     lambda e, t: jp.save_compressed(e.params, str(t / "out"), masks=without(e.masks, "norm")),
     InvalidArgumentError, r"masks must be shaped like params .*paths only in params \[.*'norm'"),
    ("save-checkpoint-masks-not-bool",
     lambda e, t: jp.save_checkpoint(str(t / "out"), e.params, masks=float_masks(e)),
     InvalidArgumentError, r"masks must be shaped like params .*must be boolean"),
    # method / mode / kind names
    ("mode-unknown", lambda e, t: jp.wanda(e.params, e.calib, mode="fast"),
     InvalidArgumentError, r"mode must be one of \('sequential', 'as-you-go', 'dense'\), got 'fast'"),
    ("stats-kind-unknown", lambda e, t: jp.input_stats(e.params, jnp.asarray(e.calib), "fisher"),
     InvalidArgumentError, r"statistics kind must be one of \('sumsq', 'hessian'\), got 'fisher'"),
    ("stream-method-unknown", lambda e, t: prune_streaming(e.hf, str(t / "out"), e.calib, method="magnitude"),
     InvalidArgumentError, r"streaming prunes with one of \('wanda', 'sparsegpt'\), got 'magnitude'"),
    # loading
    ("load-unknown-model", lambda e, t: jp.load("llama-9000"),
     CheckpointError, r"'llama-9000' does not exist: pass a Hugging Face checkpoint directory"),
    ("load-not-a-path", lambda e, t: jp.load(None),
     CheckpointError, r"a model source must be a name or path, got NoneType"),
    ("load-empty-directory", lambda e, t: jp.load(str(t)),
     CheckpointError, r"not a Hugging Face checkpoint directory \(no config.json\)"),
    ("load-missing-weights", lambda e, t: jp.load(removed(e.hf, t, "model.safetensors")),
     CheckpointError, r"no model.safetensors or model.safetensors.index.json"),
    ("load-truncated-weights", lambda e, t: jp.load(truncated(e.hf, t, "model.safetensors")),
     CheckpointError, r"model.safetensors: truncated file: tensor '.*' ends at byte \d+"),
    ("load-checkpoint-missing", lambda e, t: jp.load_checkpoint(str(t / "nope")),
     CheckpointError, r"nope: no such checkpoint directory"),
    ("load-checkpoint-incomplete", lambda e, t: jp.load_checkpoint(removed(e.ck, t, "params")),
     CheckpointError, r"not a jaxprune orbax checkpoint \(needs params/ and config/ items\)"),
    ("load-checkpoint-truncated", lambda e, t: jp.load_checkpoint(truncated(e.ck, t)),
     CheckpointError, r"cannot restore"),
    ("load-compressed-truncated", lambda e, t: jp.load_compressed(truncated(e.comp, t, "sparse.safetensors")),
     CheckpointError, r"sparse.safetensors: truncated file"),
    ("load-masks-missing-directory", lambda e, t: jp.load_masks(str(t / "nope")),
     CheckpointError, r"nope: no such checkpoint directory"),
    ("load-masks-truncated", lambda e, t: jp.load_masks(truncated(e.hf, t, "masks.safetensors")),
     CheckpointError, r"masks.safetensors: truncated file"),
    ("load-masks-other-model", lambda e, t: jp.load_masks(e.hf, params=e.other),
     CheckpointError, r"masks.safetensors: mask '.*' has shape \(\d+, \d+\), the model \(\d+, \d+\)"),
    ("load-masks-params-not-params", lambda e, t: jp.load_masks(e.hf, params="model"),
     InvalidArgumentError, r"load_masks: params must be jaxprune Params \(or None\), got str"),
    # saving
    ("save-not-params", lambda e, t: jp.save(e.params.tree, str(t / "out")),
     InvalidArgumentError, r"save needs jaxprune Params, got dict"),
    ("save-output-exists", lambda e, t: jp.save(e.params, e.root),
     CheckpointError, r"already exists; pass overwrite=True \(CLI: --overwrite\) to replace it"),
    ("save-output-unwritable", lambda e, t: jp.save(e.params, os.path.join(e.file, "out")),
     CheckpointError, r"cannot write to .*file\.txt"),
    ("save-compressed-output-exists", lambda e, t: jp.save_compressed(e.params, e.root),
     CheckpointError, r"already exists; pass overwrite=True"),
    ("save-compressed-output-unwritable", lambda e, t: jp.save_compressed(e.params, os.path.join(e.file, "out")),
     CheckpointError, r"cannot write to .*file\.txt"),
    ("save-checkpoint-output-exists", lambda e, t: jp.save_checkpoint(e.root, e.params),
     CheckpointError, r"already exists; pass overwrite=True to replace it"),
    ("save-checkpoint-output-unwritable", lambda e, t: jp.save_checkpoint(os.path.join(e.file, "out"), e.params),
     CheckpointError, r"cannot write to .*file\.txt"),
    ("save-format-unknown", lambda e, t: jp.save(e.params, str(t / "out"), format="onnx"),
     InvalidArgumentError, r"format must be one of \('hf', 'gguf'\) \(or None: from the path\), got 'onnx'"),
    ("save-hf-dtype", lambda e, t: jp.save(e.params, str(t / "out"), dtype="float16"),
     InvalidArgumentError, r"dtype= applies to GGUF files \(format='gguf'\)"),
    ("save-gguf-not-llama", lambda e, t: jp.save(opt_params(), str(t / "out.gguf")),
     UnsupportedModelError, r"GGUF export writes Llama models \(arch 'llama'\); got arch 'opt'"),
    ("save-gguf-dtype-unknown", lambda e, t: jp.save(e.params, str(t / "out.gguf"), dtype="int8"),
     InvalidArgumentError, r"GGUF dtype must be one of float32, float16, bfloat16, got 'int8'"),
    ("save-gguf-masks", lambda e, t: jp.save(e.params, str(t / "out.gguf"), masks=e.masks),
     InvalidArgumentError, r"a GGUF file holds no masks or extra files"),
    ("save-gguf-tokenizer-not-bpe", lambda e, t: jp.save(e.params, str(t / "out.gguf"), tokenizer=e.tok),
     UnsupportedModelError,
     r"GGUF export writes byte-level BPE tokenizers \(llama.cpp's 'gpt2'\); this one is 'WordLevel'"),
    ("save-gguf-output-exists", lambda e, t: jp.save(e.params, e.file, format="gguf"),
     CheckpointError, r"file\.txt already exists; pass overwrite=True \(CLI: --overwrite\) to replace it"),
    ("save-gguf-output-is-directory", lambda e, t: jp.save(e.params, e.root, format="gguf", overwrite=True),
     CheckpointError, r"is a directory; a GGUF file needs a file path"),
    # reports
    ("report-no-report-json", lambda e, t: jp.report.render(str(t)),
     CheckpointError, r"no report.json \(is it the --out directory of `jaxprune prune`\?\)"),
    ("report-corrupt-json", lambda e, t: jp.report.render(report_dir(t, "{")),
     CheckpointError, r"corrupt report.json"),
    # the command line
    ("cli-sparsity-out-of-range", lambda e, t: cli("prune", e.hf, "--sparsity", "2", "--out", t / "out"),
     CLIExit, r"jaxprune: error: --sparsity: sparsity must lie in \[0, 1\), got 2\.0"),
    ("cli-sparsity-not-a-number", lambda e, t: cli("prune", e.hf, "--sparsity", "half", "--out", t / "out"),
     CLIExit, r"argument --sparsity: invalid float value: 'half'"),
    ("cli-pattern-invalid", lambda e, t: cli("prune", e.hf, "--pattern", "4:2", "--out", t / "out"),
     CLIExit, r"jaxprune: error: --pattern: N:M pattern needs 0 < N < M, got 4:2"),
    ("cli-seqlen-below-two", lambda e, t: cli("prune", e.hf, "--seqlen", "1", "--out", t / "out"),
     CLIExit, r"jaxprune: error: --seqlen must be at least 2, got 1"),
    ("cli-method-unknown", lambda e, t: cli("prune", e.hf, "--method", "random", "--out", t / "out"),
     CLIExit, r"argument --method: invalid choice: 'random'"),
    ("cli-stream-method", lambda e, t: cli("prune", e.hf, "--stream", "--method", "magnitude", "--out", t / "out"),
     CLIExit, r"jaxprune: error: --stream prunes with wanda or sparsegpt, not magnitude"),
    ("cli-target-out-of-range", lambda e, t: cli("prune", e.hf, "--method", "bonsai", "--target", "1.5",
                                                 "--out", t / "out"),
     CLIExit, r"jaxprune: error: --method bonsai needs --target, a fraction in \(0, 1\)"),
    ("cli-recover-steps-zero", lambda e, t: cli("recover", e.hf, "--teacher", e.hf, "--out", t / "out", "--steps", "0"),
     CLIExit, r"jaxprune: error: --steps must be a positive integer, got 0"),
    ("cli-output-exists", lambda e, t: cli("prune", e.hf, "--out", e.root),
     CLIExit, r"jaxprune: error: .* already exists; pass --overwrite to replace it"),
    ("cli-output-unwritable", lambda e, t: cli("prune", e.hf, "--out", os.path.join(e.file, "out")),
     CLIExit, r"jaxprune: error: cannot write .*: .*file\.txt is not a writable directory"),
    ("cli-output-missing", lambda e, t: cli("prune", e.hf),
     CLIExit, r"the following arguments are required: --out"),
    ("cli-unknown-model", lambda e, t: cli("info", "llama-9000"),
     CLIExit, r"jaxprune: error: 'llama-9000' does not exist"),
    ("cli-unknown-command", lambda e, t: cli("shrink"),
     CLIExit, r"argument command: invalid choice: 'shrink'"),
    ("cli-report-no-report-json", lambda e, t: cli("report", t),
     CLIExit, r"jaxprune: error: .*: no report.json"),
]


@pytest.mark.parametrize("call,error,message", [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_rejected(call, error, message, env, tmp_path):
    with pytest.raises(error, match=message) as info:
        call(env, tmp_path)
    if error is CLIExit:
        assert info.value.code == 2
    else:
        assert isinstance(info.value, jp.JaxpruneError)


def doc_rows() -> dict[str, str]:
    """id -> error-type cell of every row of the table in docs/errors.md (the "Hostile files and
    faults" section after it is kept in sync by tests/test_hostile_files.py)."""
    rows = {}
    with open(DOC) as f:
        for line in f:
            if line.startswith("## Hostile files and faults"):
                break
            m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|(.*?)\|\s*(.*?)\s*\|", line)
            if m:
                assert m.group(1) not in rows, f"duplicate id {m.group(1)} in docs/errors.md"
                rows[m.group(1)] = m.group(3)
    return rows


def test_the_table_lists_exactly_these_cases():
    rows = doc_rows()
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
    assert set(rows) == set(ids)
    for case_id, _, error, _ in CASES:
        expected = "exit 2" if error is CLIExit else error.__name__
        assert expected in rows[case_id], f"{case_id}: docs/errors.md says {rows[case_id]!r}, the test {expected}"
