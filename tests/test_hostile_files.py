"""Hostile checkpoints: every malformed file is rejected with a jaxprune error, fast, in bounded memory.

Two parts:

- **The corpus** (`tests/fixtures/hostile/make_corpus.py`): hand-made hostile files of every kind
  (config.json, safetensors headers, sharded indexes, tokenizer.json, GGUF, orbax, jaxprune's
  compressed format, a streaming run's state). One worker process
  (`tests/workers/hostile_worker.py`) reads each case in a child forked from it and measures its
  time and peak resident memory; each case must give its documented error and message in under
  2 s and 200 MB above the child's start.
- **Fuzzing**: `hypothesis` mutates valid tiny checkpoints of each kind (truncation, bit flips,
  huge counts and lengths, wrong types, negative or overlapping offsets, deep nesting, non-UTF-8
  names, paths out of the directory) and reads them in-process: only `JaxpruneError`s may
  escape, each call takes under 2 s of CPU time (10 s of wall time) and 200 MB (tracemalloc's
  peak). Examples are derandomized (the same every run) and bounded in number.

Every test here is a row of docs/errors.md's "Hostile files and faults" section
(`test_the_docs_list_every_hostile_file_and_fault_test` checks both ways).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jaxprune as jp
from jaxprune.errors import CheckpointError, JaxpruneError
from jaxprune.io import hf, safetensors as st_io
from jaxprune.io.gguf_check import check_gguf
from jaxprune.oneshot import stream_files

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from forkrun import reset_peak, status  # noqa: E402  (tests/workers/forkrun.py: VmHWM helpers)

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, "..", "docs", "errors.md")
WORKER = os.path.join(HERE, "workers", "hostile_worker.py")
LIMIT_S, LIMIT_BYTES = 2.0, 200 << 20


def _corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", os.path.join(HERE, "fixtures", "hostile", "make_corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CORPUS = _corpus_module()
GGUF_CASES = [c[0] for c in CORPUS.CASES if c[1] == "gguf"]


# ----------------------------------------------------------------------------- the corpus


def _tree(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            else:
                with open(p, "rb") as fh:
                    out[rel] = fh.read()
    return out


def test_corpus_is_what_its_script_writes(tmp_path):
    """The committed corpus is exactly what make_corpus.py builds (so it is reproducible and reviewed)."""
    CORPUS.build(str(tmp_path / "corpus"))
    committed, built = _tree(os.path.join(HERE, "fixtures", "hostile", "corpus")), _tree(str(tmp_path / "corpus"))
    assert sorted(committed) == sorted(built)
    assert [k for k in built if committed[k] != built[k]] == []


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus = str(root / "corpus")
    shutil.copytree(os.path.join(HERE, "fixtures", "hostile", "corpus"), corpus, symlinks=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXPRUNE_PROGRESS": "0"}
    r = subprocess.run([sys.executable, WORKER, corpus, str(root / "results.json")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(root / "results.json") as f:
        return json.load(f)


def _bounded_result(res: dict, case: str) -> None:
    assert res["seconds"] < LIMIT_S, f"{case}: {res['seconds']:.2f} s"
    assert res["peak_bytes"] < LIMIT_BYTES, f"{case}: {res['peak_bytes'] / 2**20:.0f} MB"


def test_corpus_base_loads(corpus_results):
    """The valid checkpoint every HF case starts from loads (the cases fail for their one change)."""
    assert corpus_results["base-hf"]["ok"], corpus_results["base-hf"]


@pytest.mark.parametrize("case_id,kind,error,message", [
    pytest.param(c[0], c[1], c[3], c[4], id=c[0]) for c in CORPUS.CASES])
def test_corpus(corpus_results, case_id, kind, error, message):
    res = corpus_results[case_id]
    assert not res["ok"], f"{case_id} was accepted"
    assert res["type"] == error and res["jaxprune"], f"{case_id}: {res['type']}: {res['message'][:500]}"
    assert re.search(message, res["message"]), f"{case_id}: {res['message'][:500]}"
    assert len(res["message"]) < 600, f"{case_id}: a {len(res['message'])}-character message"
    _bounded_result(res, case_id)


@pytest.mark.parametrize("case_id", GGUF_CASES)
def test_corpus_gguf_through_load(corpus_results, case_id):
    """Each hostile GGUF file of the corpus, read by `jp.load`: a jaxprune error within the bounds."""
    res = corpus_results[case_id + "@load"]
    assert not res["ok"] and res["jaxprune"], f"{case_id}: {res['type']}: {res['message'][:300]}"
    _bounded_result(res, case_id)


def test_oversized_files_are_rejected_before_parsing(tmp_path, monkeypatch):
    """Size limits come before any parsing (limits lowered here so the files stay small)."""
    src = jp.save(jp.init(TINY, jax.random.key(0)), str(tmp_path / "m"), max_shard_bytes=600)
    monkeypatch.setattr(hf, "MAX_CONFIG_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"config.json has \d+ bytes \(at most 100\)"):
        jp.load(src)
    monkeypatch.setattr(hf, "MAX_CONFIG_BYTES", 4 << 20)
    monkeypatch.setattr(hf, "MAX_INDEX_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"index has \d+ bytes \(at most 100\)"):
        jp.load(src)
    monkeypatch.setattr(hf, "MAX_INDEX_BYTES", 64 << 20)
    monkeypatch.setattr(st_io, "MAX_HEADER_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"header claims \d+ bytes"):
        jp.load(src)
    from jaxprune.data import tokenization
    tok_dir = tmp_path / "tok"
    _tokenizer_dir(str(tok_dir))
    monkeypatch.setattr(tokenization, "MAX_TOKENIZER_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"tokenizer.json has \d+ bytes \(at most 100\)"):
        jp.tokenizer(str(tok_dir))


def test_reads_stay_inside_the_directory_but_follow_the_hub_cache(tmp_path):
    """A hub cache snapshot (every file a symlink into the repository's blobs/) loads; a shard
    symlinked out of the checkpoint directory is refused."""
    src = jp.save(jp.init(TINY, jax.random.key(0)), str(tmp_path / "m"), max_shard_bytes=600)
    repo = tmp_path / "hub" / "models--o--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for k, f in enumerate(sorted(os.listdir(src))):
        shutil.copy(os.path.join(src, f), blobs / f"blob{k}")
        os.symlink(f"../../blobs/blob{k}", snap / f)
    assert jp.load(str(snap)).config == TINY
    shard = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
    (tmp_path / "elsewhere").mkdir()
    shutil.move(os.path.join(src, shard), tmp_path / "elsewhere" / shard)
    os.symlink(tmp_path / "elsewhere" / shard, os.path.join(src, shard))
    with pytest.raises(CheckpointError, match="leads outside the directory"):
        jp.load(src)


def test_check_gguf_accepts_real_files(bases):
    """check_gguf accepts what jaxprune writes and the bundled SmolLM2 file (Q4_1, a 49k-token
    vocabulary), and says where the data starts."""
    from jaxprune.io.resolve import BUILTIN
    paths = [bases["gguf"]]
    try:
        paths.append(BUILTIN["smollm2-135m"]())
    except CheckpointError:
        pass   # the weights package is not installed here
    for path in paths:
        t0 = time.perf_counter()
        info = check_gguf(path)
        assert time.perf_counter() - t0 < LIMIT_S
        assert 0 < info.data_offset < os.path.getsize(path) and info.n_tensors == len(info.tensors)


# ----------------------------------------------------------------------------- fuzzing: mutations

HUGE = [2**64 - 1, 2**63, 2**63 - 1, 2**62, 2**40, 2**32 - 1, 2**31, 10**12, 10**9, 65536]
VALUES = [-1, -2**63, 0, 1, 7, 1.5, float("nan"), "", "x" * 300, "F128", "BF16", "../../outside", "/etc/passwd",
          "a/b", "\udcff", None, True, [], {}, [1, [2]], {"dtype": "F32"}] + HUGE
DEEP, BAD_UTF8 = "\x00deep\x00", "\x00bad-utf8\x00"


def _serialize(obj) -> bytes:
    """JSON bytes of `obj` with the DEEP placeholder made 5000 brackets deep and BAD_UTF8 raw 0xff."""
    text = json.dumps(obj, separators=(",", ":")).encode()
    text = text.replace(json.dumps(DEEP).encode(), ("[" * 5000 + "]" * 5000).encode())
    return text.replace(json.dumps(BAD_UTF8)[1:-1].encode(), b"\xff\xfe")


def _slots(obj, out=None):
    """(container, key) of every value inside a parsed JSON document."""
    out = [] if out is None else out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in list(items):
        out.append((obj, k))
        _slots(v, out)
    return out


def mutate_json(data, obj):
    """One hostile change to a parsed JSON document (in place): a value replaced, a key removed or
    renamed, a value wrapped 5000 levels deep."""
    slots = _slots(obj)
    if not slots:
        return DEEP
    parent, key = slots[data.draw(st.integers(0, len(slots) - 1), label="slot")]
    how = data.draw(st.sampled_from(["value", "value", "delete", "rename", "deep"]), label="how")
    if how == "value":
        parent[key] = data.draw(st.sampled_from(VALUES + [BAD_UTF8]), label="value")
    elif how == "deep":
        parent[key] = DEEP
    elif isinstance(parent, dict):
        v = parent.pop(key)
        if how == "rename":
            parent[data.draw(st.sampled_from(["", BAD_UTF8, "\udcff", "x" * 300, "model.layers.99999999.x.weight",
                                              "model.norm.weight.x.weight", "__metadata__"]), label="name")] = v
    else:
        parent[key] = None
    return obj


def mutate_bytes(data, raw: bytes) -> bytes:
    """One byte-level change: truncation, a bit flip, a hostile u32/u64, inserted or zeroed bytes."""
    how = data.draw(st.sampled_from(["truncate", "flip", "u64", "u32", "insert", "zero"]), label="bytes")
    pos = data.draw(st.integers(0, max(0, len(raw) - 1)), label="pos")
    if how == "truncate":
        return raw[:pos]
    if how == "flip":
        return raw[:pos] + bytes([raw[pos] ^ (1 << data.draw(st.integers(0, 7), label="bit"))]) + raw[pos + 1:] if raw else raw
    if how in ("u64", "u32"):
        v = data.draw(st.sampled_from(HUGE + [0, 1, 5, 99]), label="int")
        b = struct.pack("<Q", v % 2**64) if how == "u64" else struct.pack("<I", v % 2**32)
        return raw[:pos] + b + raw[pos + len(b):]
    if how == "insert":
        return raw[:pos] + data.draw(st.binary(min_size=1, max_size=16), label="inserted") + raw[pos:]
    return raw[:pos] + b"\0" * 16 + raw[pos + 16:]


def mutate_safetensors(data, raw: bytes) -> bytes:
    """A safetensors file with its JSON header changed (length prefix kept right, or not), or bytes changed."""
    if data.draw(st.booleans(), label="header-level"):
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        text = _serialize(mutate_json(data, header))
        length = len(text) if data.draw(st.integers(0, 4), label="length-ok") else n
        return struct.pack("<Q", length) + text + raw[8 + n:]
    return mutate_bytes(data, raw)


def mutate_json_file(data, raw: bytes) -> bytes:
    if data.draw(st.booleans(), label="json-level"):
        return _serialize(mutate_json(data, json.loads(raw)))
    return mutate_bytes(data, raw)


def bounded(call):
    """Run `call()`: a JaxpruneError is returned, anything else escapes. It must take under 2 s of
    CPU time (this process's, all threads: what a claimed size would make it spend, whatever else
    the machine runs) and under 10 s of wall time (no waiting), and allocate under 200 MB
    (tracemalloc's peak for Python objects and numpy buffers; the growth of the resident peak,
    VmHWM, for what Rust and C++ libraries allocate)."""
    reset_peak()
    rss = status("VmRSS")
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    outcome = None
    try:
        call()
    except JaxpruneError as e:
        outcome = e
    finally:
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = max(tracemalloc.get_traced_memory()[1], status("VmHWM") - rss)
        tracemalloc.stop()
    assert cpu < LIMIT_S and seconds < 5 * LIMIT_S, f"{cpu:.2f} s of CPU, {seconds:.2f} s ({outcome})"
    assert peak < LIMIT_BYTES, f"{peak / 2**20:.0f} MB ({outcome})"
    if outcome is not None:
        assert len(str(outcome)) < 1000, f"a {len(str(outcome))}-character message"
    return outcome


# ----------------------------------------------------------------------------- fuzzing: the bases

TINY = jp.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _tokenizer_dir(path: str) -> str:
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate("abcdefgh")}
    vocab.update({"ab": 8, "cd": 9, "abcd": 10})
    backend = Backend(models.BPE(vocab, [("a", "b"), ("c", "d"), ("ab", "cd")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    os.makedirs(path, exist_ok=True)
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": [1, 2]}, f)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    params = jp.init(TINY, jax.random.key(0))
    masks = jp.magnitude(params, 0.5, pattern="2:4")
    masks = jax.tree_util.tree_map_with_path(
        lambda p, m: jax.numpy.asarray(np.random.default_rng(1).random(m.shape) < 0.7) if "down_proj" in jax.tree_util.keystr(p) else m,
        masks)   # one unstructured mask: the bitmask format too
    pruned = jp.apply_masks(params, masks)
    out = {"hf": jp.save(params, str(root / "hf")),
           "sharded": jp.save(params, str(root / "sharded"), max_shard_bytes=600),
           "gguf": jp.save(params, str(root / "m.gguf")),
           "tokenizer": _tokenizer_dir(str(root / "tok")),
           "orbax": jp.save_checkpoint(str(root / "ck"), params, masks=masks),
           "compressed": jp.save_compressed(pruned, str(root / "comp"), masks=masks)["path"],
           "work": str(root / "work")}
    os.makedirs(out["work"])
    for kind in ("hf", "sharded", "tokenizer", "orbax", "compressed"):   # each base is valid
        {"tokenizer": jp.tokenizer, "orbax": jp.load_checkpoint, "compressed": jp.load_compressed}.get(kind, jp.load)(out[kind])
    check_gguf(out["gguf"])
    jp.load(out["gguf"])
    return out


def _copy(bases, kind) -> str:
    d = tempfile.mkdtemp(dir=bases["work"])
    src = bases[kind]
    if os.path.isdir(src):
        shutil.copytree(src, os.path.join(d, "c"))
        return os.path.join(d, "c")
    shutil.copy(src, os.path.join(d, "m.gguf"))
    return os.path.join(d, "m.gguf")


def _rewrite(path: str, change) -> None:
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(change(raw))


def _files(directory: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs)


# ----------------------------------------------------------------------------- fuzzing: the tests


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_fuzz_hf_directory(bases, data):
    """config.json or model.safetensors of an HF directory mutated: `jp.load` rejects it (or loads it)."""
    d = _copy(bases, "hf")
    if data.draw(st.booleans(), label="config"):
        _rewrite(os.path.join(d, "config.json"), lambda raw: mutate_json_file(data, raw))
    else:
        _rewrite(os.path.join(d, "model.safetensors"), lambda raw: mutate_safetensors(data, raw))
    bounded(lambda: jp.load(d))
    shutil.rmtree(os.path.dirname(d))


@settings(max_examples=30, **FUZZ)
@given(data=st.data())
def test_fuzz_sharded_directory(bases, data):
    """The index (shard names included: ``..``, absolute paths, separators) or one shard mutated."""
    d = _copy(bases, "sharded")
    shards = [f for f in _files(d) if f.endswith(".safetensors")]
    target = data.draw(st.sampled_from(["model.safetensors.index.json"] + shards), label="file")
    if target.endswith(".json"):
        _rewrite(os.path.join(d, target), lambda raw: mutate_json_file(data, raw))
    else:
        _rewrite(os.path.join(d, target), lambda raw: mutate_safetensors(data, raw))
    bounded(lambda: jp.load(d))
    shutil.rmtree(os.path.dirname(d))


@functools.lru_cache(maxsize=4)
def _gguf_fields(path: str) -> list[tuple[int, int]]:
    """(byte offset, size) of every count, length, type, dim and offset field of a valid GGUF file."""
    import gguf
    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data
    parts = [p for f in r.fields.values() for p in f.parts] + [p for t in r.tensors for p in t.field.parts]
    return sorted({(int(p.ctypes.data - base), int(p.nbytes)) for p in parts if p.nbytes in (4, 8) and p.dtype.kind == "u"})


def mutate_gguf(data, raw: bytes, fields) -> bytes:
    if data.draw(st.booleans(), label="field-level"):
        pos, size = data.draw(st.sampled_from(fields), label="field")
        v = data.draw(st.sampled_from(HUGE + [0, 1, 3, 5, 9, 13, 99, 2**63 + 5]), label="value")
        b = struct.pack("<Q", v % 2**64) if size == 8 else struct.pack("<I", v % 2**32)
        return raw[:pos] + b + raw[pos + size:]
    return mutate_bytes(data, raw)


@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_fuzz_gguf_check(bases, data):
    """A GGUF file's counts, lengths, types, dims and offsets (or any bytes) mutated: `check_gguf`
    rejects it with a CheckpointError in bounds, or accepts a file whose every tensor lies in it."""
    path = _copy(bases, "gguf")
    fields = _gguf_fields(bases["gguf"])
    _rewrite(path, lambda raw: mutate_gguf(data, raw, fields))
    holder = {}
    outcome = bounded(lambda: holder.update(info=check_gguf(path)))
    assert outcome is None or isinstance(outcome, CheckpointError)
    if outcome is None:
        assert holder["info"].data_offset <= os.path.getsize(path)
    shutil.rmtree(os.path.dirname(path))


@settings(max_examples=25, **FUZZ)
@given(data=st.data())
def test_fuzz_gguf_load(bases, data):
    """Mutated GGUF files that `check_gguf` accepts: `jp.load` rejects them with a jaxprune error (or
    loads them) in bounds. (Files check_gguf rejects are not given to today's reader, which can loop
    over a claimed array: see test_corpus_gguf_through_load.)"""
    path = _copy(bases, "gguf")
    fields = _gguf_fields(bases["gguf"])
    _rewrite(path, lambda raw: mutate_gguf(data, raw, fields))
    try:
        check_gguf(path)
    except CheckpointError:
        shutil.rmtree(os.path.dirname(path))
        return
    bounded(lambda: jp.load(path))
    shutil.rmtree(os.path.dirname(path))


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_fuzz_tokenizer(bases, data):
    """tokenizer.json (or the config.json beside it) mutated: `jp.tokenizer` rejects it or reads it."""
    d = _copy(bases, "tokenizer")
    _rewrite(os.path.join(d, data.draw(st.sampled_from(["tokenizer.json", "tokenizer.json", "config.json"]))),
             lambda raw: mutate_json_file(data, raw))
    bounded(lambda: jp.tokenizer(d))
    shutil.rmtree(os.path.dirname(d))


@settings(max_examples=20, **FUZZ)
@given(data=st.data())
def test_fuzz_orbax_checkpoint(bases, data):
    """Any file of an orbax checkpoint mutated (JSON-level for its JSON files): `jp.load_checkpoint`."""
    d = _copy(bases, "orbax")
    target = data.draw(st.sampled_from(_files(d)), label="file")
    is_json = os.path.basename(target) in ("_METADATA", "_CHECKPOINT_METADATA", "metadata", "process_0", "_sharding")
    _rewrite(os.path.join(d, target), lambda raw: mutate_json_file(data, raw) if is_json else mutate_bytes(data, raw))
    bounded(lambda: jp.load_checkpoint(d))
    shutil.rmtree(os.path.dirname(d))


def mutate_compressed(data, raw: bytes) -> bytes:
    """sparse.safetensors with its per-tensor format metadata (N:M, bitmask, shapes) mutated, or
    the file itself."""
    if data.draw(st.booleans(), label="format-metadata"):
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        infos = json.loads(header["__metadata__"]["jaxprune_compressed"])
        header["__metadata__"]["jaxprune_compressed"] = _serialize(mutate_json(data, infos)).decode("utf-8", "replace")
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + raw[8 + n:]
    return mutate_safetensors(data, raw)


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_fuzz_compressed(bases, data):
    """A `save_compressed` directory's sparse.safetensors mutated: `jp.load_compressed`."""
    d = _copy(bases, "compressed")
    _rewrite(os.path.join(d, "sparse.safetensors"), lambda raw: mutate_compressed(data, raw))
    bounded(lambda: jp.load_compressed(d))
    shutil.rmtree(os.path.dirname(d))


def _state_files(tmp: str) -> tuple[dict, list, list]:
    files = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    masks = ["masks-00001-of-00002.safetensors", "masks-00002-of-00002.safetensors"]
    for f in files + masks + [stream_files.activations_file(1)]:
        with open(os.path.join(tmp, f), "wb") as fh:
            fh.write(f.encode() * 8)
    sums = {f: stream_files.file_sha256(os.path.join(tmp, f))
            for f in (files[0], masks[0], files[2], stream_files.activations_file(1))}
    state = {"fingerprint": "f" * 64, "done": 1, "names": {"model.layers.0.mlp.up_proj.weight": files[0],
                                                          "model.norm.weight": files[2]},
             "masks": {"model.layers.0.mlp.up_proj.weight": masks[0]},
             "statistics": [{"layer": 0, "sparsity": 0.5}], "checksums": sums}
    return state, files, masks


@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_fuzz_streaming_state(bases, data):
    """A streaming run's state.json mutated — as bytes, as JSON, or as JSON re-sealed with a right
    checksum (a buggy writer) — is rejected by `load_state` / `check_state`, or is valid; a layer
    file changed by one byte is always found by `first_bad_layer`."""
    tmp = tempfile.mkdtemp(dir=bases["work"])
    state, files, masks = _state_files(tmp)
    path = os.path.join(tmp, "state.json")
    stream_files.save_state(state, path)
    assert stream_files.first_bad_layer(tmp, stream_files.check_state(stream_files.load_state(path), path, files, masks),
                                        files, masks) == 1
    how = data.draw(st.sampled_from(["bytes", "json", "resealed", "layer-file"]), label="how")
    if how == "layer-file":
        _rewrite(os.path.join(tmp, data.draw(st.sampled_from([files[0], masks[0]]))),
                 lambda raw: mutate_bytes(data, raw) if raw else raw)
        found = stream_files.first_bad_layer(tmp, state, files, masks)
        changed = stream_files.file_sha256(os.path.join(tmp, files[0])) != state["checksums"][files[0]] or \
            stream_files.file_sha256(os.path.join(tmp, masks[0])) != state["checksums"][masks[0]]
        assert found == (0 if changed else 1)
    else:
        if how == "bytes":
            _rewrite(path, lambda raw: mutate_bytes(data, raw))
        elif how == "json":
            _rewrite(path, lambda raw: _serialize(mutate_json(data, json.loads(raw))))
        else:
            changed = mutate_json(data, dict(state))
            if isinstance(changed, dict):
                stream_files.save_state(changed, path)
            else:
                _rewrite(path, lambda raw: _serialize(changed))
        bounded(lambda: stream_files.check_state(stream_files.load_state(path), path, files, masks))
    shutil.rmtree(tmp)


# ----------------------------------------------------------------------------- docs/errors.md


SECTION = "## Hostile files and faults"


def documented_ids() -> list[str]:
    """Test ids in the rows of docs/errors.md's hostile-files-and-faults section."""
    with open(DOC) as f:
        text = f.read()
    assert SECTION in text, f"docs/errors.md has no '{SECTION}' section"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\|\s*`(test_[a-z_]+\.py::[^`]+)`\s*\|", body, flags=re.M)


def expected_ids() -> list[str]:
    """Every test of this file (but this check) and of tests/test_write_faults.py, the corpus cases
    one by one."""
    ids = []
    for name in ("test_hostile_files.py", "test_write_faults.py"):
        with open(os.path.join(HERE, name)) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and \
                    node.name != "test_the_docs_list_every_hostile_file_and_fault_test":
                if node.name == "test_corpus":
                    ids += [f"{name}::test_corpus[{c[0]}]" for c in CORPUS.CASES]
                else:
                    ids.append(f"{name}::{node.name}")
    return ids


def test_the_docs_list_every_hostile_file_and_fault_test():
    rows, ids = documented_ids(), expected_ids()
    assert len(rows) == len(set(rows)), "duplicate rows"
    assert sorted(set(ids) - set(rows)) == [], "tests missing from docs/errors.md"
    assert sorted(set(rows) - set(ids)) == [], "rows of docs/errors.md without a test"
