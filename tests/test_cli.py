"""The `jaxprune` command on a small checkpoint written by transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxprune.cli import main

from conftest import tiny_opt


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt")
    tiny_opt(vocab_size=300).save_pretrained(str(d))
    return str(d)


def test_info_prints_architecture_and_counts(opt_dir, capsys):
    assert main(["info", opt_dir]) == 0
    out = capsys.readouterr().out
    # 300*64 token + 130*64 position embeddings; per layer 4*(64*64+64) + 2*(2*64) + 2*64*128 + 128 + 64
    per_layer = 4 * (64 * 64 + 64) + 2 * 128 + (64 * 128 + 128) + (128 * 64 + 64)
    assert "opt, 2 layers, hidden 64" in out
    assert f"non-embedding {2 * per_layer + 128:,}" in out
    assert "fc1" in out


def with_char_tokenizer(opt_dir, tmp_path):
    """A copy of the checkpoint with a one-token-per-character tokenizer.json."""
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["[UNK]"] = 95
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    d = tmp_path / "ckpt"
    shutil.copytree(opt_dir, d)
    tk.save(str(d / "tokenizer.json"))
    return d


def test_eval_on_a_text_file(opt_dir, tmp_path, capsys):
    d = with_char_tokenizer(opt_dir, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    assert main(["eval", str(d), "--text", str(text), "--seqlen", "32"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "windows x 32 tokens" in out


def test_errors_exit_2_with_a_message(capsys):
    assert main(["info", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "jaxprune.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "info" in r.stdout and "eval" in r.stdout


def test_prune_writes_checkpoint_report_and_table(opt_dir, tmp_path, capsys):
    import json
    import jaxprune as jp
    d = with_char_tokenizer(opt_dir, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged.\n\nThat a single man. " * 30)
    out = tmp_path / "out"
    argv = ["prune", str(d), "--method", "wanda", "--sparsity", "0.5", "--calib", str(text), "--n-calib", "4",
            "--seqlen", "32", "--eval-text", str(text), "--eval-windows", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "wanda" in printed and "50.0%" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "wanda" and report["sparsity_achieved"]["prunable"] == 0.5
    assert report["perplexity"]["pruned"] > 0 and "prune_s" in report["timings"]
    assert jp.sparsity_summary(jp.magnitude(jp.load(str(out)), 0.0))["total_size"] > 0
    assert main(argv) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    check_layer_statistics(report, jp.load(d), jp.load_masks(str(out)))
    # `jaxprune report` on this run and a magnitude run: plots and a markdown summary.
    mag = tmp_path / "mag"
    assert main([*argv[:3], "magnitude", *argv[4:-2], str(mag), "--no-progress"]) == 0
    assert main(["report", str(out), str(mag), "--out", str(tmp_path / "rep")]) == 0
    check_report(tmp_path / "rep", [report, json.loads((mag / "report.json").read_text())],
                 ["perplexity.png", "layers-0-out.png", "layers-1-mag.png"])
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no report.json" in capsys.readouterr().err


def check_layer_statistics(report, dense, masks):
    """report.json's per-layer statistics against numpy on the dense weights and the saved masks."""
    import numpy as np
    rows = report["layer_statistics"]
    assert len(rows) == dense.config.num_hidden_layers
    for i, row in enumerate(rows):
        for name, stats in row["modules"].items():
            node_w, node_m = dense["layers"][i], masks["layers"][i]
            for k in name.split("."):
                node_w, node_m = node_w[k], node_m[k]
            w, m = np.asarray(node_w["kernel"], np.float64), np.asarray(node_m["kernel"])
            assert stats["sparsity"] == pytest.approx(1 - m.mean())
            assert stats["norm_removed"] == pytest.approx((w[~m] ** 2).sum() / (w ** 2).sum(), rel=1e-5)
        assert {n.split(".")[-1] for n in row["modules"]} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def check_report(rep, reports, plots):
    """PNG files that decode, and a markdown table carrying each run's perplexities."""
    import matplotlib.image
    assert sorted(p.name for p in rep.glob("*.png")) == sorted(plots)
    for p in plots:
        img = matplotlib.image.imread(str(rep / p))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
    md = (rep / "report.md").read_text()
    for r in reports:
        assert f"| {r['perplexity']['dense']:.2f} | {r['perplexity']['pruned']:.2f} |" in md
    assert all(f"]({p})" in md for p in plots)


@pytest.mark.parametrize("method", ["bonsai", "finercut"])
def test_structured_prune_writes_a_smaller_model(opt_dir, tmp_path, capsys, method):
    import json
    import jaxprune as jp
    from jaxprune.structured.units import non_embedding_params
    d = with_char_tokenizer(opt_dir, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged.\n\nThat a single man. " * 30)
    out = tmp_path / "out"
    argv = ["prune", str(d), "--method", method, "--target", "0.2", "--calib", str(text), "--n-calib", "2",
            "--calib-seqlen", "16", "--samples", "8", "--seqlen", "32", "--eval-text", str(text),
            "--eval-windows", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert method in captured.out and "non-embedding" in captured.out
    assert ("round 1" in captured.err) if method == "bonsai" else ("removed" in captured.err)
    report = json.loads((out / "report.json").read_text())
    assert report["non_embedding_params"]["removed_fraction"] >= 0.2
    small = jp.load(str(out))
    assert non_embedding_params(small) == report["non_embedding_params"]["pruned"]
    assert main(["prune", str(d), "--method", method, "--out", str(tmp_path / "o2")]) == 2  # no --target
    assert "--target" in capsys.readouterr().err
    # What was removed, per layer, agrees with the compacted model's shapes.
    structure = report["structure"]
    assert len(structure) == 2 and "versions" in report
    for i, row in enumerate(structure):
        layer = small["layers"][i] if i < len(small["layers"]) else {}
        assert row["attn_removed"] == ("self_attn" not in layer)
        assert row["mlp_removed"] == ("fc1" not in layer)
        if "ffn_kept" in row and not row["mlp_removed"]:
            assert row["ffn_kept"] == layer["fc1"]["kernel"].shape[1]
    assert main(["report", str(out)]) == 0
    check_report(out / "report", [report], ["perplexity.png", "layers.png"])


def test_prune_stream_equals_in_memory_masks(opt_dir, tmp_path, capsys):
    import json
    import jax
    import numpy as np
    import jaxprune as jp
    from jaxprune.oneshot.streaming import load_masks
    d = with_char_tokenizer(opt_dir, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged.\n\nThat a single man. " * 30)
    common = ["--method", "wanda", "--sparsity", "0.5", "--calib", str(text), "--n-calib", "4", "--seqlen", "32",
              "--no-progress"]
    assert main(["prune", str(d), "--stream", "--out", str(tmp_path / "s")] + common) == 0
    assert main(["prune", str(d), "--eval-text", str(text), "--eval-windows", "2", "--out", str(tmp_path / "m")]
                + common) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["streamed"] and report["method"] == "wanda"
    in_memory = json.loads((tmp_path / "m" / "report.json").read_text())["layer_statistics"]
    assert [r["layer"] for r in report["layer_statistics"]] == [r["layer"] for r in in_memory]
    for a, b in zip(report["layer_statistics"], in_memory):     # streamed stats == in-memory ones
        assert a["modules"].keys() == b["modules"].keys()
        assert a["sparsity"] == pytest.approx(b["sparsity"])
        for name in a["modules"]:
            assert a["modules"][name] == pytest.approx(b["modules"][name], rel=1e-5), name
    assert main(["report", str(tmp_path / "s")]) == 0                  # a streamed run has per-layer plots too
    assert (tmp_path / "s" / "report" / "layers.png").stat().st_size > 0
    params = jp.load(str(tmp_path / "m"))
    for a, b in zip(jax.tree.leaves(load_masks(str(tmp_path / "m"), params)),
                    jax.tree.leaves(load_masks(str(tmp_path / "s")))):
        np.testing.assert_array_equal(a, b)
    assert main(["prune", "/no/such/dir", "--stream", "--out", str(tmp_path / "x")] + common) == 2
    assert "not one" in capsys.readouterr().err


def test_prune_on_a_mesh_records_it(opt_dir, tmp_path, capsys):
    import json
    d = with_char_tokenizer(opt_dir, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged.\n\nThat a single man. " * 30)
    out = tmp_path / "out"
    argv = ["prune", str(d), "--method", "sparsegpt", "--calib", str(text), "--n-calib", "4", "--seqlen", "32",
            "--eval-text", str(text), "--eval-windows", "2", "--out", str(out), "--no-progress",
            "--model-parallel", "1"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["devices"]["mesh"] == {"data": 1, "model": 1} and report["devices"]["processes"] == 1


def test_multi_host_flags_are_checked(monkeypatch, capsys):
    monkeypatch.delenv("JAXPRUNE_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAXPRUNE_PROCESS_ID", raising=False)
    assert main(["prune", "--coordinator", "localhost:1", "--out", "/tmp/never"]) == 2
    assert "number of processes" in capsys.readouterr().err


def test_generate_streams_the_engine_continuation(opt_dir, tmp_path, capsys):
    import jaxprune as jp
    d = with_char_tokenizer(opt_dir, tmp_path)
    assert main(["generate", str(d), "--prompt", "Hello there", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    tok = jp.tokenizer(str(d))
    expected = jp.generate(jp.load(str(d)), ["Hello there"], 12, tokenizer=tok)[0]
    assert out == "Hello there" + expected + "\n"
    assert main(["generate", str(d), "--prompt", "Hi", "--max-new-tokens", "5", "--temperature", "0.9",
                 "--top-k", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Hi")
