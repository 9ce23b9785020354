"""Compressed storage: N:M packed values + index bits, bit-packed unstructured masks, exact round trips."""

from __future__ import annotations

import math
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp
from jaxprune.io.compressed import FILE, decode, encode, pack_bits, unpack_bits

from conftest import tiny_llama, tiny_opt


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).dtype == np.asarray(y).dtype and
                                      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_bit_packing_round_trips(bits, data):
    vals = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=50)), np.uint8)
    packed = pack_bits(vals, bits)
    assert packed.nbytes == math.ceil(vals.size * bits / 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, vals.size), vals)


def random_nm_mask(rng, out_, in_, n, m):
    """A mask keeping exactly n random entries of every m consecutive inputs (numpy, independent)."""
    scores = rng.random((out_, in_ // m, m))
    order = np.argsort(scores, -1)
    keep = np.zeros_like(scores, bool)
    np.put_along_axis(keep, order[..., :n], True, -1)
    return keep.reshape(out_, in_)


@settings(max_examples=40, deadline=None)
@given(nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 8), (2, 8), (5, 16)]), out_=st.integers(1, 6),
       groups=st.integers(1, 5), dtype=st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]),
       seed=st.integers(0, 2**16))
def test_nm_tensors_pack_and_restore_exactly(nm, out_, groups, dtype, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    keep = random_nm_mask(rng, out_, groups * m, n, m)
    w = np.where(keep, rng.standard_normal(keep.shape), 0).astype(dtype)
    arrays, info = encode("w", w, keep)
    if info["format"] == "dense":       # packing would not be smaller (e.g. 3:4 or tiny tensors)
        assert sum(a.nbytes for a in encode("w", w, keep)[0].values()) == w.nbytes
        return
    assert info["format"] == "nm"
    n2, m2 = info["n"], info["m"]          # a random 4:8 mask may also be 2:4; the smallest M is used
    assert n2 * m == n * m2 and m2 <= m and (keep.reshape(out_, -1, m2).sum(-1) == n2).all()
    assert arrays["w.values"].nbytes == w.nbytes * n // m
    assert arrays["w.nm_index"].nbytes == math.ceil(keep.sum() * math.ceil(math.log2(m2)) / 8)
    w2, keep2 = decode("w", arrays, info)
    assert w2.dtype == w.dtype and np.array_equal(w2, w) and np.array_equal(keep2, keep)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9)), density=st.floats(0.0, 0.6),
       seed=st.integers(0, 2**16))
def test_unstructured_masks_are_bit_packed_and_restore_exactly(shape, density, seed):
    rng = np.random.default_rng(seed)
    keep = rng.random(shape) < density
    keep.flat[0] = False                  # never all True
    w = np.where(keep, rng.standard_normal(shape), 0).astype(np.float32)
    arrays, info = encode("w", w, keep)
    if info["format"] == "dense":
        assert keep.sum() * 4 + math.ceil(keep.size / 8) >= w.nbytes
        return
    assert info["format"] in ("bitmask", "nm")
    if info["format"] == "bitmask":
        assert arrays["w.mask_bits"].nbytes == math.ceil(keep.size / 8)
        assert arrays["w.values"].size == keep.sum()
    w2, keep2 = decode("w", arrays, info)
    assert np.array_equal(w2, w) and np.array_equal(keep2, keep)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


@pytest.mark.parametrize("kind", ["llama-gqa-wanda-50", "opt-sparsegpt-2:4", "llama-magnitude-4:8-bf16"])
def test_pruned_models_round_trip_exactly_and_are_smaller(tmp_path, kind):
    src = str(tmp_path / "src")
    (tiny_opt() if kind.startswith("opt") else tiny_llama()).save_pretrained(src)
    params = jp.load(src, dtype=ml_dtypes.bfloat16 if kind.endswith("bf16") else np.float32)
    calib = np.random.default_rng(0).integers(0, params.config.vocab_size, (4, 16)).astype(np.int32)
    if "wanda" in kind:
        masks = jp.wanda(params, calib, 0.5)
        pruned = jp.apply_masks(params, masks)
    elif "sparsegpt" in kind:
        pruned, masks = jp.sparsegpt(params, calib, 0.5, pattern="2:4", blocksize=32)
    else:
        masks = jp.magnitude(params, 0.5, pattern="4:8")
        pruned = jp.apply_masks(params, masks)
    info = jp.save_compressed(pruned, str(tmp_path / "c"), masks=masks)
    back, back_masks = jp.load_compressed(info["path"])
    assert leaves_equal(back, pruned)
    assert leaves_equal(back_masks, jax.tree.map(lambda x: np.asarray(x, bool), masks))
    # Formats: the pruned kernels are packed, in the pattern asked for.
    fmts = info["formats"]
    kernel_fmts = {f for n, f in fmts.items() if ".layers." in n and "norm" not in n and n.endswith("weight")}
    assert kernel_fmts == ({"bitmask"} if "wanda" in kind else {"nm"})
    # Sizes: the report matches the file, and dense is the sum of the tensors' bytes.
    assert info["bytes_on_disk"] == os.path.getsize(os.path.join(info["path"], FILE))
    assert info["dense_bytes"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(pruned))
    assert info["bytes_on_disk"] < dir_size(jp.save(pruned, str(tmp_path / "dense")))
    # jp.load reads the compressed directory too (as float32 by default).
    assert leaves_equal(jp.load(info["path"], dtype=None), pruned)


def test_masks_default_to_the_nonzero_pattern_of_layer_kernels(tmp_path):
    cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2)
    params = jp.init(cfg, jax.random.key(1))
    pruned = jp.apply_masks(params, jp.magnitude(params, 0.6))
    info = jp.save_compressed(pruned, str(tmp_path / "c"))
    back, masks = jp.load_compressed(info["path"])
    assert leaves_equal(back, pruned)
    k = np.asarray(pruned["layers"][1]["mlp"]["down_proj"]["kernel"])
    assert np.array_equal(masks["layers"][1]["mlp"]["down_proj"]["kernel"], k != 0)
    assert masks["embed_tokens"]["embedding"].all()


def test_weights_under_false_masks_and_bad_trees_are_rejected(tmp_path):
    cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)
    params = jp.init(cfg, jax.random.key(0))
    masks = jp.magnitude(params, 0.5)
    with pytest.raises(jp.InvalidArgumentError, match="apply the masks first"):
        jp.save_compressed(params, str(tmp_path / "a"), masks=masks)
    with pytest.raises(jp.InvalidArgumentError, match="shaped like params"):
        jp.save_compressed(params, str(tmp_path / "b"), masks={"layers": []})
    assert not os.listdir(tmp_path)
    out = jp.save_compressed(jp.apply_masks(params, masks), str(tmp_path / "c"), masks=masks)["path"]
    with pytest.raises(jp.CheckpointError, match="already exists"):
        jp.save_compressed(jp.apply_masks(params, masks), out, masks=masks)
    with pytest.raises(jp.CheckpointError, match="not a compressed"):
        jp.load_compressed(jp.save(params, str(tmp_path / "plain")))
