"""Selection rules against plain numpy, and invariants with hypothesis."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import jaxprune as jp
from jaxprune.sparsity import masks as M


def np_keep_top(scores, keep, axis):
    """Keep the `keep` largest along axis; ties prune the lower index first (unstructured rule)."""
    s = np.moveaxis(scores, axis, -1)
    out = np.zeros(s.shape, bool)
    for idx in np.ndindex(s.shape[:-1]):
        row = s[idx]
        order = sorted(range(len(row)), key=lambda j: (-row[j], -j))
        out[idx][order[:keep]] = True
    return np.moveaxis(out, -1, axis)


def torch_nm_keep(scores, n, m):
    """Keep n of every m along axis 0: prune what the reference's torch.topk(group, m - n,
    largest=False) prunes (its CPU choice among ties; see tests/test_nm_ties.py)."""
    groups = torch.from_numpy(np.ascontiguousarray(np.moveaxis(scores.reshape(-1, m, *scores.shape[1:]), 1, -1)))
    pruned = torch.zeros(groups.shape, dtype=torch.bool)
    pruned.scatter_(-1, torch.topk(groups.float(), m - n, dim=-1, largest=False)[1], True)
    return np.moveaxis(~pruned.numpy(), -1, 1).reshape(scores.shape)


scores_2d = st.tuples(st.integers(1, 12), st.integers(1, 6)).flatmap(
    lambda s: arrays(np.float32, s, elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 7.5])))


@given(scores_2d, st.floats(0, 0.99))
@settings(max_examples=15, deadline=None)
def test_per_output_selection_matches_numpy_and_is_exact(scores, sparsity):
    got = np.asarray(M.per_output_mask(jnp.asarray(scores), sparsity))
    n_in = scores.shape[0]
    keep = n_in - int(n_in * sparsity)
    np.testing.assert_array_equal(got, np_keep_top(scores, keep, 0))
    assert (got.sum(axis=0) == keep).all()


@given(scores_2d, st.floats(0, 0.99))
@settings(max_examples=12, deadline=None)
def test_per_layer_selection_matches_numpy(scores, sparsity):
    got = np.asarray(M.per_layer_mask(jnp.asarray(scores), sparsity))
    keep = scores.size - int(scores.size * sparsity)
    np.testing.assert_array_equal(got.ravel(), np_keep_top(scores.ravel(), keep, 0))


signed_2d = st.tuples(st.integers(1, 12), st.integers(1, 6)).flatmap(
    lambda s: arrays(np.float32, s, elements=st.sampled_from([-3.0, -0.0, 0.0, 0.5, 1.0, 2.0, -2.0, 7.5])))


@given(signed_2d, st.floats(0, 1.0), st.booleans())
@settings(max_examples=20, deadline=None)
def test_host_selection_matches_numpy(scores, keep_share, flat):
    """keep_top_host (numpy introselect, the CPU path) keeps what the compiled keep_top keeps, and,
    -0 being ordered below +0 by both, what the plain sort keeps once -0 reads as +0."""
    if flat:
        scores = scores.ravel()
    axis = 0 if scores.ndim == 2 else -1
    keep = int(round(keep_share * scores.shape[axis]))
    got = M.keep_top_host(scores, keep, axis=axis)
    np.testing.assert_array_equal(got, np.asarray(M.keep_top(jnp.asarray(scores), keep, axis=axis)))
    if not np.any(np.signbit(scores) & (scores == 0)):
        np.testing.assert_array_equal(got, np_keep_top(scores, keep, axis))


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_magnitude_host_path_equals_compiled_path(scope):
    """On the CPU jp.magnitude selects with numpy; the masks equal the compiled selection's, on
    quantized-looking weights with many ties."""
    import jax
    cfg = jp.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    params = jp.init(cfg, jax.random.key(0))
    params = jax.tree.map(lambda w: jnp.round(w * 8) / 8, params)   # few distinct values: many ties
    got = jp.magnitude(params, 0.5, scope=scope)
    from jaxprune.oneshot.pruning import _magnitude_select
    from jaxprune.core.params import get_path
    for path in [("layers", 0, "mlp", "down_proj", "kernel"), ("layers", 1, "self_attn", "k_proj", "kernel")]:
        k = get_path(params.tree, path)
        n = k.shape[0] if scope == "row" else k.size
        want = _magnitude_select(k, M.n_pruned(n, 0.5), nm=None, scope=scope)
        np.testing.assert_array_equal(np.asarray(get_path(got.tree, path)), np.asarray(want))


@given(st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]), st.integers(1, 4), st.integers(1, 5), st.data())
@settings(max_examples=12, deadline=None)
def test_nm_keeps_exactly_n_in_every_group(nm, groups, n_out, data):
    n, m = nm
    scores = data.draw(arrays(np.float32, (groups * m, n_out), elements=st.sampled_from([0.0, 1.0, 2.0, -1.0])))
    got = np.asarray(M.nm_mask(jnp.asarray(scores), n, m))
    g = got.reshape(groups, m, n_out)
    assert (g.sum(axis=1) == n).all()
    np.testing.assert_array_equal(got, torch_nm_keep(scores, n, m))


def test_global_selection_across_tensors():
    a, b = np.array([[5.0, 1.0]]), np.array([[2.0], [4.0], [3.0]])
    got = M.global_masks({"a": jnp.asarray(a), "b": jnp.asarray(b)}, 0.4)
    assert np.asarray(got["a"]).tolist() == [[True, False]]
    assert np.asarray(got["b"]).ravel().tolist() == [False, True, True]


@given(arrays(np.float32, (6, 4), elements=st.floats(-3, 3, width=32)), arrays(np.bool_, (6, 4)))
@settings(max_examples=40, deadline=None)
def test_apply_masks_is_idempotent_and_zeroes_exactly_the_pruned(w, keep):
    once = M.apply_masks({"w": jnp.asarray(w)}, {"w": jnp.asarray(keep)})
    twice = M.apply_masks(once, {"w": jnp.asarray(keep)})
    np.testing.assert_array_equal(np.asarray(once["w"]), np.asarray(twice["w"]))
    np.testing.assert_array_equal(np.asarray(once["w"]), np.where(keep, w, 0))


@pytest.mark.parametrize("pattern,match", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"),
                                           ("two:four", "N:M"), ("2-4", "N:M")])
def test_bad_patterns(pattern, match):
    with pytest.raises(jp.InvalidArgumentError, match=match):
        M.parse_pattern(pattern)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "half", True])
def test_bad_sparsity(sparsity):
    with pytest.raises(jp.InvalidArgumentError, match="sparsity"):
        M.check_sparsity(sparsity)


def test_nm_requires_m_to_divide_the_inputs():
    with pytest.raises(jp.InvalidArgumentError, match="does not divide"):
        M.nm_mask(jnp.ones((6, 2)), 2, 4)


def test_mismatched_mask_trees_are_named():
    with pytest.raises(jp.InvalidArgumentError, match="only in params"):
        M.apply_masks({"a": jnp.ones(2), "b": jnp.ones(2)}, {"a": jnp.ones(2, bool), "c": jnp.ones(2, bool)})
    with pytest.raises(jp.InvalidArgumentError, match="has shape"):
        M.apply_masks({"a": jnp.ones(2)}, {"a": jnp.ones(3, bool)})


def test_summary_counts():
    s = M.summary({"a": np.array([True, False, False, True]), "b": np.ones(4, bool)})
    assert s["pruned_sparsity"] == 0.5 and s["total_sparsity"] == 0.25
    assert s["layers"]["['a']"]["zeros"] == 2
