"""Faults while writing: the destination holds the complete result or nothing visible.

The writers — jaxprune's compressed format, `jp.save` to a Hugging Face directory, orbax
checkpoints (`jp.save_checkpoint`), reports (`jp.report.render`) and streamed pruning — are run
by one worker process (`tests/workers/write_fault_worker.py`) in children forked from it, and:

- SIGKILLed at random moments (a new destination, and one being overwritten) and right after the
  commit's first rename: the destination is absent or equal to a complete write (the old one or
  the new one when overwriting); nothing visible is left beside it;
- starved of disk (RLIMIT_FSIZE with SIGXFSZ ignored, so writes fail with EFBIG): a clear
  CheckpointError and nothing left at all;
- racing another writer for one destination: exactly one wins, the other gets a CheckpointError,
  the result is the winner's, never a mix.

A streamed run killed at a random point, or starved of disk, resumes (in this process) to the
files of an uninterrupted run, and a resumed run finds a damaged layer file, mask file or
activations file by its checksum and redoes that layer.
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxprune as jp
from jaxprune.errors import CheckpointError
from jaxprune.oneshot import streaming

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "write_fault_worker.py")
SEED = int(os.environ.get("JAXPRUNE_FAULT_SEED", random.randrange(2**31)))


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXPRUNE_PROGRESS": "0"}
    r = subprocess.run([sys.executable, WORKER, str(root), str(SEED)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"seed {SEED}: {r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["root"] = str(root)
    return out


# ----------------------------------------------------------------------------- comparing results


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same_trees(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb))


def _content(kind: str, path: str):
    """What a complete write of `kind` at `path` holds, comparable with ==-like `_same`."""
    if kind == "compressed":
        return jp.load_compressed(path)
    if kind == "hf":
        return jp.load(path, dtype=None), jp.load_masks(path)
    if kind == "orbax":
        ck = jp.load_checkpoint(path)
        return ck.params, ck.masks
    files = sorted(os.listdir(path))
    return files, [open(os.path.join(path, f), "rb").read() for f in files]


def _same(kind: str, a, b) -> bool:
    if kind == "report":
        return a == b
    return all(_same_trees(x, y) for x, y in zip(a, b))


def _which(kind: str, dest: str, faults) -> int | None:
    """The variant (0 or 1) whose complete write `dest` holds; None when absent; AssertionError when
    it holds something else (half-written, mixed, unreadable)."""
    if not os.path.lexists(dest):
        return None
    try:
        got = _content(kind, dest)
    except Exception as e:   # noqa: BLE001 - an unreadable result is the failure being tested for
        raise AssertionError(f"seed {SEED}: {dest} is there but unreadable: {type(e).__name__}: {e}") from None
    for v in (0, 1):
        if _same(kind, got, _content(kind, os.path.join(faults["root"], "ref", f"{kind}-{v}"))):
            return v
    raise AssertionError(f"seed {SEED}: {dest} holds neither complete write")


def _visible(parent: str) -> list[str]:
    return sorted(f for f in os.listdir(parent) if not f.startswith("."))


# ----------------------------------------------------------------------------- SIGKILL


def test_sigkill_at_random_points_leaves_the_result_or_nothing(faults):
    """Each writer SIGKILLed at random moments of a write to a new destination: the destination is
    absent or complete, and only hidden temporary files can be left beside it."""
    absent = 0
    for kind, rows in faults["kill"].items():
        for row in rows:
            v = _which(kind, row["dest"], faults)
            assert v in (None, 0), (kind, row)
            absent += v is None
        parent = os.path.dirname(rows[0]["dest"])
        assert _visible(parent) == sorted(os.path.basename(r["dest"]) for r in rows if os.path.lexists(r["dest"]))
    assert absent, f"seed {SEED}: every kill came after the write finished (nothing was tested)"


def test_sigkill_while_overwriting_keeps_the_old_or_the_new(faults):
    """SIGKILL at random moments of `overwrite=True` writes: the old or the new checkpoint, never none."""
    for kind, rows in faults["overwrite-kill"].items():
        for row in rows:
            assert _which(kind, row["dest"], faults) in (0, 1), (kind, row)
            assert _visible(os.path.dirname(row["dest"])) == sorted(os.path.basename(r["dest"]) for r in rows)


def test_sigkill_right_after_the_commit_of_an_orbax_overwrite(faults):
    """Killed right after the call that swaps the new orbax checkpoint into place: it is there."""
    row = faults["rename-kill"]["orbax"]
    assert row["status"] == signal.SIGKILL or row["type"].startswith("exit"), row
    assert _which("orbax", row["dest"], faults) in (0, 1)


def test_sigkill_right_after_the_first_rename_of_an_hf_overwrite(faults):
    """jp.save / save_compressed with overwrite=True, killed right after write_directory's first
    rename (the old directory moved aside): the destination must still hold a complete checkpoint."""
    for kind in ("hf", "compressed"):
        assert _which(kind, faults["rename-kill"][kind]["dest"], faults) in (0, 1), kind


# ----------------------------------------------------------------------------- full disk


def _check_disk(faults, kind):
    for row in faults["disk"][kind]:
        if row["ok"]:   # the limit was above every file: a complete result
            assert _which(kind, os.path.join(row["parent"], "dest"), faults) == 0
            assert os.listdir(row["parent"]) == ["dest"]
        else:
            assert row["type"] == "CheckpointError", (kind, row)
            assert "File too large" in row["message"] and len(row["message"]) < 400, (kind, row)
            assert os.listdir(row["parent"]) == [], (kind, row["limit"], os.listdir(row["parent"]))
    assert not all(row["ok"] for row in faults["disk"][kind])


def test_full_disk_gives_a_clear_error_and_leaves_nothing(faults):
    """Compressed format, orbax checkpoint, report: file size limits of 0 and 20 kB (20 kB for the
    report) make their writes fail with EFBIG: a CheckpointError naming it, and nothing left, not
    even hidden."""
    for kind in ("compressed", "orbax", "report"):
        _check_disk(faults, kind)


def test_full_disk_while_saving_an_hf_directory(faults):
    _check_disk(faults, "hf")


# ----------------------------------------------------------------------------- two writers


def _check_race(faults, kind, race):
    res = race["results"]
    won = [k for k, r in enumerate(res) if r["ok"]]
    assert len(won) == 1, (kind, race)
    lost = res[1 - won[0]]
    assert lost["type"] == "CheckpointError" and re.search("already exists|another process", lost["message"]), lost
    assert _which(kind, race["dest"], faults) == won[0]


def test_two_writers_one_destination_one_wins(faults):
    """Orbax checkpoints and reports: two processes released together (and, in the second race,
    both held until each has passed its "already exists" check): one wins, the other gets a
    CheckpointError, the destination holds the winner's complete result."""
    for kind in ("orbax", "report"):
        for race in faults["race"][kind]:
            _check_race(faults, kind, race)


def test_concurrent_hf_writes_never_mix(faults):
    """jp.save and save_compressed racing for one directory: the result is one complete write."""
    for kind in ("hf", "compressed"):
        for race in faults["race"][kind]:
            assert any(r["ok"] for r in race["results"]), race
            assert _which(kind, race["dest"], faults) in (0, 1)


def test_two_hf_writers_one_destination_one_wins(faults):
    for kind in ("hf", "compressed"):
        _check_race(faults, kind, next(r for r in faults["race"][kind] if r["barrier"]))


# ----------------------------------------------------------------------------- streaming


def _tensors(d: str) -> dict:
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update({f"{f}:{k}": v for k, v in load_file(os.path.join(d, f)).items()})
    return out


def _same_output(a: str, b: str) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@pytest.fixture(scope="module")
def stream_env(faults):
    """The worker's streaming source, calibration tokens and reference output. Objects alive now are
    frozen out of the garbage collector while these tests run: streaming calls gc.collect a dozen
    times per layer, each a full pass over this process's large heap otherwise."""
    gc.freeze()
    yield _stream_env(faults)
    gc.unfreeze()


def _stream_env(faults):
    s = faults["stream"]
    won = [k for k, r in enumerate(s["race"]["results"]) if r["ok"]]
    assert won, s["race"]
    return {"source": s["source"], "calib": np.load(s["calib"]), "reference": s["race"]["dest"]}


def _stream(env, out, **kw):
    return streaming.prune_streaming(env["source"], out, env["calib"], "wanda", 0.5, show_progress=False, **kw)


def test_streaming_two_runs_one_output_one_wins(faults, stream_env):
    """Two streamed runs into one output: the work directory's lock lets one run, the other gets a
    CheckpointError at once; the output is complete."""
    res = faults["stream"]["race"]["results"]
    assert sorted(r["ok"] for r in res) == [False, True], res
    lost = next(r for r in res if not r["ok"])
    assert lost["type"] == "CheckpointError" and re.search("another process|already exists", lost["message"]), lost
    assert jp.load(stream_env["reference"]).config.num_hidden_layers == 3


def test_streaming_killed_at_a_random_point_resumes_to_the_same_files(faults, stream_env, tmp_path):
    """A streamed run SIGKILLed at a random point, resumed: the files of an uninterrupted run."""
    killed = faults["stream"]["killed"]
    assert not killed["ok"] and not os.path.exists(killed["dest"]), f"seed {SEED}: the run was not killed: {killed}"
    _stream(stream_env, killed["dest"])
    _same_output(killed["dest"], stream_env["reference"])
    assert not os.path.exists(killed["dest"] + ".partial")


def test_streaming_full_disk_then_resume(stream_env, tmp_path):
    """A streamed run whose layer files cannot be written (RLIMIT_FSIZE 20 kB here): CheckpointError,
    no output, no half-written file in its work directory; the resumed run completes."""
    out = str(tmp_path / "out")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(CheckpointError, match=r"File too large.*run again to resume"):
            _stream(stream_env, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert not os.path.exists(out)
    assert [f for f in os.listdir(out + ".partial") if ".tmp" in f] == []
    _stream(stream_env, out)
    _same_output(out, stream_env["reference"])


class _Stop(Exception):
    pass


def _stop_after(k):
    def on_layer(i):
        if i == k:
            raise _Stop
    return on_layer


def test_streaming_redoes_a_damaged_layer(stream_env, tmp_path):
    """A run stopped after layer 1 of 3; one file then damaged (a bit flipped) before resuming: the
    resumed run finds it by its checksum in state.json and redoes that layer (layer 0's damaged
    masks: from the start; layer 1's weights or its output activations: layer 1 again) and ends
    with the files of an uninterrupted run. A damaged state.json is a CheckpointError, and
    overwrite=True starts over."""
    stopped = str(tmp_path / "stopped")
    with pytest.raises(_Stop):
        _stream(stream_env, stopped, on_layer=_stop_after(1))
    with open(os.path.join(stopped + ".partial", "state.json")) as f:
        assert json.load(f)["done"] == 2
    for k, (damaged, redo) in enumerate([("model-00002-of-00004.safetensors", [1, 2]),
                                         ("masks-00001-of-00003.safetensors", [0, 1, 2]),
                                         ("activations-00002.npy", [1, 2]),
                                         ("model-00004-of-00004.safetensors", [0, 1, 2])]):
        out = str(tmp_path / f"case{k}")
        shutil.copytree(stopped + ".partial", out + ".partial")
        path = os.path.join(out + ".partial", damaged)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 3)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))
        resumed = []
        _stream(stream_env, out, on_layer=resumed.append)
        assert resumed == redo, damaged
        _same_output(out, stream_env["reference"])
    out = str(tmp_path / "state")
    shutil.copytree(stopped + ".partial", out + ".partial")
    state = os.path.join(out + ".partial", "state.json")
    with open(state) as f:
        text = f.read()
    with open(state, "w") as f:
        f.write(text.replace('"done": 2', '"done": 3'))
    with pytest.raises(CheckpointError, match="corrupt state of an unfinished run .*checksum"):
        _stream(stream_env, out)
    resumed = []
    _stream(stream_env, out, on_layer=resumed.append, overwrite=True)
    assert resumed == [0, 1, 2]
    _same_output(out, stream_env["reference"])

