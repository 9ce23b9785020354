"""Layer streaming: equal to in-memory pruning, resumable after a kill, peak memory about one layer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.oneshot import streaming
from jaxprune.io.safetensors import open_safetensors

WORKER = os.path.join(os.path.dirname(__file__), "workers", "stream_worker.py")

LLAMA = jp.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
OPT = jp.OPTConfig(vocab_size=99, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=64)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXPRUNE_PROGRESS"] = "0"
    return env


def _calib(cfg, n=6, T=24, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, T))


def _tensors(directory):
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update({k: np.asarray(v) for k, v in open_safetensors(os.path.join(directory, f)).items()})
    return out


@pytest.mark.parametrize("cfg,method,low_memory", [(LLAMA, "wanda", True), (OPT, "sparsegpt", True),
                                                    (LLAMA, "sparsegpt", False), (OPT, "wanda", False)],
                         ids=["llama-gqa-wanda-low-memory", "opt-sparsegpt-low-memory", "llama-gqa-sparsegpt",
                              "opt-wanda"])
def test_streamed_equals_in_memory(tmp_path, cfg, method, low_memory, monkeypatch):
    # low memory: op-by-op passes with matmuls in blocks of 32 output columns, as a 7B layer gets
    # blocks with the default 32 MiB; otherwise the whole-layer jitted passes small layers get
    monkeypatch.setattr("jaxprune.calibration.capture.BLOCK_BYTES", 32 * 4 * max(cfg.hidden_size, 128))
    params = jp.init(cfg, jax.random.key(0))
    src = jp.save(params, str(tmp_path / "dense"))
    calib = _calib(cfg)
    out = streaming.prune_streaming(src, str(tmp_path / "pruned"), calib, method, 0.5, batch_size=4,
                                    blocksize=32, low_memory=low_memory, show_progress=False)
    if method == "wanda":
        masks = jp.wanda(params, calib, 0.5, batch_size=4)
        pruned = jp.apply_masks(params, masks)
    else:
        pruned, masks = jp.sparsegpt(params, calib, 0.5, batch_size=4, blocksize=32)
    got, got_masks = jp.load(out), streaming.load_masks(out)
    assert not os.path.exists(out + ".partial")
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(got_masks)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 if method == "sparsegpt" else 0)


def test_bf16_checkpoint_keeps_its_dtype_and_exact_half_sparsity(tmp_path):
    cfg = LLAMA
    src = streaming.write_random_checkpoint(str(tmp_path / "bf16"), cfg, ml_dtypes.bfloat16, seed=3)
    out = streaming.prune_streaming(src, str(tmp_path / "out"), _calib(cfg), "wanda", 0.5, pattern="2:4",
                                    show_progress=False)
    t = _tensors(out)
    k = t["model.layers.1.mlp.up_proj.weight"]
    assert k.dtype == ml_dtypes.bfloat16
    nz = (k.astype(np.float32) != 0).reshape(k.shape[0], -1, 4).sum(-1)
    assert (nz <= 2).all()
    src_t = _tensors(src)
    np.testing.assert_array_equal(t["model.embed_tokens.weight"], src_t["model.embed_tokens.weight"])


def test_kill_and_resume_gives_the_same_files(tmp_path):
    """A real SIGKILL after layer k is committed, then a resumed run: identical to an uninterrupted one."""
    cfg = jp.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    src = jp.save(jp.init(cfg, jax.random.key(0)), str(tmp_path / "dense"))
    np.save(tmp_path / "calib.npy", _calib(cfg))
    for method in ("sparsegpt",):   # weight updates change what later layers see: the harder case
        whole, cut = str(tmp_path / f"{method}-whole"), str(tmp_path / f"{method}-cut")
        r = subprocess.run([sys.executable, WORKER, "prune", src, whole, str(tmp_path / "calib.npy"), method],
                           env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        p = subprocess.Popen([sys.executable, WORKER, "prune", src, cut, str(tmp_path / "calib.npy"), method, "1"],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = p.stdout.readline()
            assert line.strip() == "committed 1", p.stderr.read()[-3000:]
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
        finally:
            p.kill()
        assert p.returncode == -signal.SIGKILL
        with open(os.path.join(cut + ".partial", "state.json")) as f:
            assert json.load(f)["done"] == 2          # layers 0 and 1 finished, the rest not started
        assert not os.path.exists(cut)
        resumed_layers, stats = [], []
        streaming.prune_streaming(src, cut, np.load(tmp_path / "calib.npy"), method, 0.5, blocksize=32,
                                  show_progress=False, on_layer=resumed_layers.append, statistics=stats)
        assert resumed_layers == [2, 3, 4]            # it continued; it did not start over
        assert [r["layer"] for r in stats] == [0, 1, 2, 3, 4]   # statistics of the killed run's layers kept
        assert all(r["sparsity"] == pytest.approx(0.5) for r in stats)
        a, b = _tensors(whole), _tensors(cut)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert sorted(os.listdir(whole)) == sorted(os.listdir(cut))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures Linux VmHWM")
def test_peak_memory_about_one_7b_layer(tmp_path):
    """Layers shaped like Llama-7B's (hidden 4096, FFN 11008, 32 heads) in bf16, two of them: peak RSS
    above the bare runtime stays below 2 x one layer + the activations."""
    cfg = jp.LlamaConfig(vocab_size=512, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    src = streaming.write_random_checkpoint(str(tmp_path / "7b-shaped"), cfg, ml_dtypes.bfloat16)
    np.save(tmp_path / "calib.npy", _calib(cfg, n=2, T=128))
    r = subprocess.run([sys.executable, WORKER, "rss", src, str(tmp_path / "out"), str(tmp_path / "calib.npy")],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    used = m["peak"] - m["baseline"]
    budget = 2 * m["layer"] + m["activations"]
    print(f"7B-shaped bf16 layer {m['layer'] / 2**20:.0f} MiB, activations {m['activations'] / 2**20:.1f} MiB, "
          f"runtime {m['baseline'] / 2**20:.0f} MiB, peak {m['peak'] / 2**20:.0f} MiB "
          f"(+{used / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB), {m['seconds']:.1f} s")
    assert used < budget
    assert len(m["kept"]) == 2 * 7 and all(v == 0.5 for v in m["kept"].values()), m["kept"]   # really pruned
    assert m["layer"] == 2 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)   # 7B-sized: attention, MLP, two norms


def test_bad_inputs(tmp_path):
    params = jp.init(LLAMA, jax.random.key(0))
    src = jp.save(params, str(tmp_path / "dense"))
    calib = _calib(LLAMA)
    with pytest.raises(jp.InvalidArgumentError, match="streaming prunes with one of"):
        streaming.prune_streaming(src, str(tmp_path / "o"), calib, "magnitude")
    with pytest.raises(jp.DataError, match="token ids"):
        streaming.prune_streaming(src, str(tmp_path / "o"), calib + 1000, "wanda")
    with pytest.raises(jp.CheckpointError, match="already exists"):
        streaming.prune_streaming(src, src, calib, "wanda")
    with pytest.raises(jp.CheckpointError, match="no config.json"):
        streaming.prune_streaming(str(tmp_path), str(tmp_path / "o"), calib, "wanda")
    # an unfinished run with other settings is never silently mixed with a new one
    os.makedirs(tmp_path / "o.partial")
    with open(tmp_path / "o.partial" / "state.json", "w") as f:
        json.dump({"fingerprint": "other", "done": 1}, f)
    with pytest.raises(jp.CheckpointError, match="unfinished run with other settings"):
        streaming.prune_streaming(src, str(tmp_path / "o"), calib, "wanda")
    assert os.path.exists(tmp_path / "o.partial" / "state.json")
