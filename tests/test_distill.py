"""Recovery by distillation (`jp.distill`, `jaxprune recover`): the losses against numpy, training
lowers the KL of a compacted student, masks and shapes survive (full weights and LoRA), a killed
run resumes to bit-identical weights, bad inputs are refused, the CLI runs end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import importlib

import jaxprune as jp
from jaxprune.errors import CheckpointError, InvalidArgumentError
from jaxprune.training.losses import distillation_loss, kl_divergence, top_k_kl, top_k_targets
from jaxprune.training.teacher import teacher_targets, teacher_top_k

from test_compile_once import count_compiles
from workers.distill_worker import problem

D = importlib.import_module("jaxprune.training.distill")   # the module (jaxprune.training.distill is the function)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "distill_worker.py")
CFG = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def peaked(params):
    """Matrices scaled by 4: a random model with non-uniform next-token distributions (KLs that matter)."""
    return jax.tree.map(lambda x: x * 4 if x.ndim == 2 else x, params)


@pytest.fixture(scope="module")
def setup():
    teacher = peaked(jp.init(CFG, jax.random.key(0)))
    gates = {"ffn": jnp.ones((2, 64)).at[:, 40:].set(0), "heads": jnp.ones((2, 4)).at[:, 3].set(0)}
    student = jp.compact(teacher, gates)
    calib = np.asarray(jax.random.randint(jax.random.key(1), (24, 16), 0, 64), np.int32)
    return teacher, student, calib[:20], calib[20:]


# ----------------------------------------------------------------------------- numpy references


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl(t_logits, s_logits, T):
    """Mean over positions of T^2 * KL(softmax(t / T) || softmax(s / T)), float64."""
    lt, ls = np_log_softmax(t_logits / T), np_log_softmax(s_logits / T)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1)) * T * T)


def np_top_k_kl(t_logits, s_logits, T, k):
    """The documented top-k loss from the full logits: the KL between teacher and student coarsened
    to the teacher's k most likely tokens (numpy's argsort) plus one bucket for all the others,
    both from their full softmax at temperature T, times T^2; mean over positions."""
    idx = np.argsort(-t_logits, axis=-1, kind="stable")
    top, rest = idx[..., :k], idx[..., k:]
    p, q = np.exp(np_log_softmax(t_logits / T)), np.exp(np_log_softmax(s_logits / T))
    p_s, q_s = np.take_along_axis(p, top, -1), np.take_along_axis(q, top, -1)
    p_r, q_r = np.take_along_axis(p, rest, -1).sum(-1), np.take_along_axis(q, rest, -1).sum(-1)
    kl = np.sum(p_s * np.log(p_s / q_s), -1) + p_r * np.log(p_r / q_r)
    return float(np.mean(kl) * T * T)


def logits64(params, tokens):
    return np.asarray(jp.forward(params, jnp.asarray(tokens)), np.float64)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_losses_equal_numpy(setup, T):
    teacher, student, calib, _ = setup
    batch = calib[:3]
    t, s = logits64(teacher, batch), logits64(student, batch)
    ref = np_kl(t, s, T)
    assert ref > 1e-2                                            # a KL that is not trivially zero
    assert float(jnp.mean(kl_divergence(t.astype(np.float32), s.astype(np.float32), T))) == pytest.approx(ref, rel=1e-4)
    assert float(distillation_loss(student, teacher, jnp.asarray(batch), temperature=T)) == pytest.approx(ref, rel=1e-4)
    full = {"logits": teacher_targets(teacher, batch)["logits"]}
    loss, parts = D.distill_objective(student, jnp.asarray(batch), full, T)
    assert float(loss) == pytest.approx(ref, rel=1e-4) and float(parts["kl"]) == float(loss)
    # top-k: through the compact cache (float16 log-probabilities), against numpy on the float64 logits
    k = 8
    cache = teacher_top_k(teacher, batch, k, temperature=T, batch_size=2, show_progress=False)
    np.testing.assert_array_equal(cache.indices, np.argsort(-t, axis=-1, kind="stable")[..., :k])
    assert (cache.log_probs.dtype, cache.indices.dtype, cache.log_rest.dtype) == (np.float16, np.int32, np.float32)
    np.testing.assert_allclose(np.exp(cache.log_rest), 1 - np.exp(np_log_softmax(t / T))[
        np.arange(3)[:, None, None], np.arange(16)[None, :, None], cache.indices].sum(-1), rtol=1e-4)
    ref_k = np_top_k_kl(t, s, T, k)
    assert 0.05 * ref < ref_k < 0.95 * ref                      # a lower bound on the full KL, not a copy of it
    for dtype, rel in ((np.float16, 1e-2), (np.float32, 1e-4)):   # float16 log-probabilities: ~1e-3 relative
        cache = teacher_top_k(teacher, batch, k, temperature=T, batch_size=2, dtype=dtype, show_progress=False)
        cached = {"log_probs": cache.log_probs, "indices": cache.indices, "log_rest": cache.log_rest}
        loss_k, _ = D.distill_objective(student, jnp.asarray(batch), cached, T)
        assert float(loss_k) == pytest.approx(ref_k, rel=rel), dtype
    exact = top_k_kl(*top_k_targets(jnp.asarray(t, jnp.float32), k, T), jnp.asarray(s, jnp.float32), T)
    assert float(jnp.mean(exact)) == pytest.approx(ref_k, rel=1e-4)
    whole = top_k_kl(*top_k_targets(jnp.asarray(t, jnp.float32), CFG.vocab_size, T), jnp.asarray(s, jnp.float32), T)
    assert float(jnp.mean(whole)) == pytest.approx(ref, rel=1e-4)          # k = V: the full KL
    same = top_k_kl(*top_k_targets(jnp.asarray(t, jnp.float32), k, T), jnp.asarray(t, jnp.float32), T)
    assert float(jnp.max(jnp.abs(same))) < 1e-5                             # zero at the teacher


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode", ["full", "top-k+hidden", "lora"])
def test_training_lowers_the_kl_of_a_compacted_student(setup, mode):
    teacher, student, calib, held = setup
    kw = {"full": dict(lr=3e-3), "top-k+hidden": dict(lr=3e-3, teacher_top_k=16, hidden_weight=0.1),
          "lora": dict(lora_rank=4, lr=1e-2)}[mode]
    # measured: held-out KL x0.54 / x0.80 / x0.72, training loss (last 6 vs first 6 steps) x0.38 / x0.38 / x0.48
    kl_ratio = {"full": 0.7, "top-k+hidden": 0.9, "lora": 0.85}[mode]
    seen = []
    res = D.distill(student, teacher, calib, key=jax.random.key(0), steps=24, batch_size=4, eval_calib=held,
                    eval_every=24, log_every=1, show_progress=False, callback=seen.append, **kw)
    assert seen == res.history and [r["step"] for r in res.history] == list(range(25))
    first, last = res.history[0], res.history[-1]
    if mode == "full":    # the recorded loss is the KL of the batch `batch_indices(split(key)[0], 0, ...)`
        idx = D.batch_indices(jax.random.split(jax.random.key(0))[0], 0, len(calib), 4)
        assert len(set(idx.tolist())) == 4 and first["lr"] == 0.0             # warm-up starts at zero
        assert first["loss"] == pytest.approx(np_kl(logits64(teacher, calib[idx]), logits64(student, calib[idx]), 1.0),
                                              rel=1e-4)
    # held-out metrics before training are the student's own, measured independently
    assert first["eval_ppl"] == pytest.approx(jp.perplexity(student, held), rel=1e-5)
    assert first["eval_kl"] == pytest.approx(np_kl(logits64(teacher, held), logits64(student, held), 1.0), rel=1e-4)
    after = np_kl(logits64(teacher, held), logits64(res.params, held), 1.0)
    assert last["eval_kl"] == pytest.approx(after, rel=1e-4)
    assert after < kl_ratio * first["eval_kl"], (first, last)
    losses = [r["loss"] for r in res.history[:-1]]
    assert np.mean(losses[-6:]) < 0.6 * np.mean(losses[:6])
    if "hidden" in mode:
        assert all(r["loss"] == pytest.approx(r["kl"] + 0.1 * r["hidden"], rel=1e-5) for r in res.history[:-1])
    assert jax.tree.map(jnp.shape, res.params.tree) == jax.tree.map(jnp.shape, student.tree)
    assert res.params.config == student.config
    assert (res.adapters is not None) == (mode == "lora")


@pytest.mark.parametrize("lora", [False, True])
def test_masks_and_shapes_are_preserved(setup, lora):
    teacher, _, calib, _ = setup
    masks = jp.wanda(teacher, calib[:4], sparsity=0.5)
    kw = dict(lora_rank=4, lr=1e-2) if lora else dict(lr=3e-3, weight_decay=0.1, teacher_top_k=8)
    res = D.distill(teacher, teacher, calib, key=jax.random.key(1), steps=6, batch_size=2, masks=masks,
                    show_progress=False, **kw)
    out, start = res.params.tree, jp.apply_masks(teacher, masks).tree
    assert jax.tree.structure(out) == jax.tree.structure(start)
    changed = 0
    for w, w0, m in zip(jax.tree.leaves(out), jax.tree.leaves(start), jax.tree.leaves(masks.tree)):
        w, w0, m = np.asarray(w), np.asarray(w0), np.asarray(m)
        assert w.shape == w0.shape and w.dtype == w0.dtype
        assert np.all(w[~m] == 0)                                       # exactly zero where pruned
        changed += int(np.sum(w[m] != w0[m]))
    assert changed > 1000                                               # and it did train
    if lora:   # LoRA trains only the adapted kernels: everything else is bit-identical
        np.testing.assert_array_equal(out["embed_tokens"]["embedding"], start["embed_tokens"]["embedding"])
        assert set(res.adapters) == {f"layers/{i}/{m}" for i in range(2) for m in (
            "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
            "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}


def test_second_run_compiles_nothing(setup):
    """The step, the teacher and the evaluation are module-level jitted functions, and the learning
    rate enters the step as a number: another key, rate and length compile nothing new."""
    teacher, student, calib, held = setup
    kw = dict(batch_size=4, eval_calib=held, show_progress=False)        # the settings of the "full" test above
    D.distill(student, teacher, calib, key=jax.random.key(0), steps=2, lr=1e-3, **kw)
    with count_compiles() as names:
        D.distill(student, teacher, calib, key=jax.random.key(5), steps=3, lr=3e-3, warmup=2, **kw)
    assert names == [], names


# ----------------------------------------------------------------------------- kill and resume


def committed_steps(d):
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def test_kill_and_resume_give_identical_weights(tmp_path):
    ck = str(tmp_path / "ck")
    env = dict(os.environ, JAXPRUNE_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, WORKER, ck], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not committed_steps(ck) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert committed_steps(ck), f"no checkpoint was committed (worker status {proc.poll()})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = committed_steps(ck)
    assert saved and max(saved) < 16, saved                 # killed before the end

    (student, teacher, calib), kw = problem()
    resumed = D.distill(student, teacher, calib, checkpoint_dir=ck, **kw)
    assert resumed.resumed_from == max(saved)
    straight = D.distill(student, teacher, calib, **kw)
    assert straight.resumed_from is None
    for a, b in zip(jax.tree.leaves(resumed.params.tree), jax.tree.leaves(straight.params.tree)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # bit for bit
    assert resumed.history == straight.history                         # the killed part's records came back
    assert [r["step"] for r in straight.history] == list(range(17))
    # a finished run in that directory returns its result again; other settings are refused
    again = D.distill(student, teacher, calib, checkpoint_dir=ck, **kw)
    assert again.resumed_from == 16 and again.history == straight.history
    with pytest.raises(CheckpointError, match=r"other settings \(lr: 0\.003 there, 0\.001 now\)"):
        D.distill(student, teacher, calib, checkpoint_dir=ck, **dict(kw, lr=1e-3))
    ck_model = jp.load_checkpoint(os.path.join(ck, "16"))            # a step directory is a model checkpoint
    np.testing.assert_array_equal(np.asarray(ck_model.params["layers"][1]["mlp"]["down_proj"]["kernel"]),
                                  np.asarray(straight.params["layers"][1]["mlp"]["down_proj"]["kernel"]))


# ----------------------------------------------------------------------------- bad inputs


def _other_vocab():
    return jp.init(jp.LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2), jax.random.key(0))


BAD = [
    ("no-key", lambda t, s, c: D.distill(s, t, c, steps=2),
     r"pass key=jax.random.key\(seed\) \(no default seed\)"),
    ("vocab-mismatch", lambda t, s, c: D.distill(_other_vocab(), t, c, key=jax.random.key(0)),
     r"student and teacher vocabularies differ: 80 vs 64 tokens"),
    ("hidden-width-mismatch",
     lambda t, s, c: D.distill(jp.compact(t, {"hidden": jnp.ones(32).at[:8].set(0)}), t, c, key=jax.random.key(0),
                               hidden_weight=1.0),
     r"the hidden-state loss needs equal widths: student hidden size 24, teacher 32"),
    ("hidden-layer-out-of-range", lambda t, s, c: D.distill(s, t, c, key=jax.random.key(0), hidden_weight=1.0,
                                                             hidden_layers=[(0, 5)]),
     r"hidden layer pair \(0, 5\) is out of range: the student has 2 layers, the teacher 2"),
    ("steps-zero", lambda t, s, c: D.distill(s, t, c, key=jax.random.key(0), steps=0),
     r"steps must be a positive integer, got 0"),
    ("steps-negative", lambda t, s, c: D.distill(s, t, c, key=jax.random.key(0), steps=-3),
     r"steps must be a positive integer, got -3"),
    ("steps-float", lambda t, s, c: D.distill(s, t, c, key=jax.random.key(0), steps=2.5),
     r"steps must be a positive integer, got 2.5"),
    ("batch-size-zero", lambda t, s, c: D.distill(s, t, c, key=jax.random.key(0), batch_size=0),
     r"batch_size must be a positive integer, got 0"),
    ("top-k-beyond-vocab", lambda t, s, c: D.distill(s, t, c, key=jax.random.key(0), teacher_top_k=65),
     r"teacher_top_k must be at most the vocabulary size 64, got 65"),
    ("temperature-zero", lambda t, s, c: D.distill(s, t, c, key=jax.random.key(0), temperature=0),
     r"temperature must be a finite number > 0.0, got 0"),
    ("calib-out-of-vocab", lambda t, s, c: D.distill(s, t, c + 64, key=jax.random.key(0)),
     r"calib token ids must lie in \[0, 64\)"),
    ("masks-other-shape", lambda t, s, c: D.distill(s, t, c, key=jax.random.key(0), masks=jp.magnitude(t, 0.5)),
     r"masks must be shaped like params"),
    ("teacher-not-params", lambda t, s, c: D.distill(s, t.tree, c, key=jax.random.key(0)),
     r"distill: teacher must be jaxprune Params"),
]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in BAD])
def test_bad_inputs_are_rejected(setup, call, message):
    teacher, student, calib, _ = setup
    with pytest.raises(InvalidArgumentError, match=message):
        call(teacher, student, calib)


# ----------------------------------------------------------------------------- command line


def char_tokenizer():
    """One token per printable ASCII character (ids 0..62), [UNK] = 63."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers
    from jaxprune.data.tokenization import Tokenizer
    vocab = {chr(i): i - 32 for i in range(32, 95)}
    vocab["[UNK]"] = 63
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return Tokenizer(backend, source="chars")


def test_cli_recover_and_report(tmp_path, capsys):
    import matplotlib.image
    from jaxprune.cli import main
    tok = char_tokenizer()
    teacher = peaked(jp.init(CFG, jax.random.key(0)))
    text = tmp_path / "t.txt"
    text.write_text("IT IS A TRUTH UNIVERSALLY ACKNOWLEDGED, THAT A SINGLE MAN IN POSSESSION OF A GOOD FORTUNE. " * 20)
    calib = jp.calibration_windows(tok, text.read_text(), n=4, seqlen=16, seed=0)
    masks = jp.wanda(teacher, calib, sparsity=0.5)
    jp.save(teacher, str(tmp_path / "dense"), tokenizer=tok)
    jp.save(jp.apply_masks(teacher, masks), str(tmp_path / "pruned"), masks=masks, tokenizer=tok)
    out = tmp_path / "out"
    argv = ["recover", str(tmp_path / "pruned"), "--teacher", str(tmp_path / "dense"), "--out", str(out),
            "--steps", "8", "--batch-size", "2", "--seqlen", "16", "--top-k", "8", "--lr", "3e-3",
            "--calib", str(text), "--n-calib", "8", "--eval-text", str(text), "--eval-windows", "2",
            "--eval-every", "4", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recovered" in printed and "teacher" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "distill" and report["training"]["steps"] == 8 and report["training"]["top_k"] == 8
    curve = [r for r in report["history"] if "loss" in r]
    assert [r["step"] for r in curve] == list(range(8)) and all(np.isfinite(r["loss"]) for r in curve)
    evals = [r for r in report["history"] if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    ppl = report["perplexity"]
    assert ppl["pruned"] == pytest.approx(evals[0]["eval_ppl"])
    assert ppl["recovered"] == pytest.approx(evals[-1]["eval_ppl"])
    ev = jp.eval_windows(tok, text.read_text(), 16, 2)
    assert ppl["dense"] == pytest.approx(jp.perplexity(teacher, ev), rel=1e-5)
    recovered, kept = jp.load(str(out)), jp.load_masks(str(out))
    for w, m, m0 in zip(jax.tree.leaves(recovered.tree), jax.tree.leaves(kept.tree), jax.tree.leaves(masks.tree)):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(m0))
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0)
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err      # no silent overwrite
    assert main(["report", str(out)]) == 0
    rep = out / "report"
    img = matplotlib.image.imread(str(rep / "loss.png"))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
    md = (rep / "report.md").read_text()
    assert "](loss.png)" in md and f"{ppl['pruned']:.2f} → {ppl['recovered']:.2f}" in md and "top_k = 8" in md
    assert main([*argv[:-1], "--steps", "0", "--out", str(tmp_path / "o2")]) == 2
    assert "--steps must be a positive integer, got 0" in capsys.readouterr().err
