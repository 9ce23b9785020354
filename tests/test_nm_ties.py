"""N:M masks equal the reference's among tied scores (issue #21).

The reference (locuslab/wanda, lib/prune.py, the `prune_n != 0` branches) builds an N:M mask
of a weight W [out, in] (torch layout) from its scores `W_metric` group by group with
`torch.topk(..., largest=False)`, whose choice among equal scores (libstdc++'s nth_element on
CPU) follows no simple index rule. `reference_nm_keep` is that code, in plain torch; jaxprune's
kernels are [in, out], so its scores are transposed on the way in and the mask on the way out.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import jaxprune as jp
from jaxprune.sparsity import masks as M
from jaxprune.sparsity.sparsegpt import prune_kernel


def reference_nm_keep(scores, n, m):
    """Keep mask [in, out] of the reference's N:M selection (keep n of every m inputs, i.e.
    prune_n = m - n) on jaxprune-layout scores [in, out]."""
    W_metric = torch.from_numpy(np.ascontiguousarray(np.asarray(scores, np.float32).T))  # [out, in]
    prune_n, prune_m = m - n, m
    W_mask = torch.zeros_like(W_metric, dtype=torch.bool)  # True = pruned
    for ii in range(W_metric.shape[1]):
        if ii % prune_m == 0:
            tmp = W_metric[:, ii:(ii + prune_m)].float()
            W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    return (~W_mask).numpy().T


def old_rule_keep(scores, n, m):
    """jaxprune's rule before issue #21: among equal scores the lower index pruned first."""
    g = scores.reshape(scores.shape[0] // m, m, -1)
    order = np.argsort(g, axis=1, kind="stable")[:, :m - n]  # the m - n pruned
    keep = np.ones(g.shape, bool)
    np.put_along_axis(keep, order, False, axis=1)
    return keep.reshape(scores.shape)


def test_examples_from_the_issue():
    """torch's picks quoted in issue #21 (2:4: prune 2 of 4), in jaxprune's [in, out] layout."""
    for group, pruned in [([1, 1, 1, 1], [2, 3]), ([2, 1, 1, 2], [1, 2]), ([3, 3, 1, 3], [2, 3])]:
        s = np.array(group, np.float32)[:, None]
        keep = np.ones(4, bool)
        keep[pruned] = False
        np.testing.assert_array_equal(reference_nm_keep(s, 2, 4)[:, 0], keep)  # torch here agrees
        np.testing.assert_array_equal(np.asarray(M.nm_mask(jnp.asarray(s), 2, 4))[:, 0], keep)
    # four equal scores under the old rule kept the last two: the comparison can fail
    assert not np.array_equal(old_rule_keep(np.ones((4, 1), np.float32), 2, 4), reference_nm_keep(np.ones((4, 1)), 2, 4))


# (n, m) pairs: 2:4 and 4:8 (the reference's), every n of m = 4 and 8, and larger groups up to 16
# (m >= 10 can reach libstdc++'s heap-selection fallback). One compilation per pair and shape.
PAIRS = [(2, 4), (1, 4), (3, 4), (4, 8), (1, 8), (2, 8), (6, 8), (7, 8), (1, 2), (1, 3), (2, 3),
         (2, 5), (3, 6), (5, 10), (5, 12), (9, 13), (4, 16), (8, 16), (15, 16)]
VALUES = {"ints": st.integers(0, 3).map(float), "two": st.sampled_from([0.0, 1.0]),
          "specials": st.sampled_from([0.0, -0.0, 1.0, 2.0, float("inf"), float("nan")])}


@st.composite
def tied_scores(draw):
    n, m = draw(st.sampled_from(PAIRS))
    values = VALUES[draw(st.sampled_from(sorted(VALUES)))]
    scores = draw(arrays(np.float32, (3 * m, 8), elements=values))  # 3 groups x 8 outputs
    return scores, n, m


# groups on which libstdc++'s introselect runs out of depth and falls back to heap selection
HEAP_GROUPS = [([9, 10, 7, 4, 4, 4, 8, 5, 6, 1, 8, 2, 9], 5), ([1, 7, 0, 3, 4, 5, 0, 7, 0, 1, 5, 4, 6, 6], 3),
               ([3, 8, 3, 5, 1, 1, 4, 8, 1, 7, 0, 0, 7, 6], 7), ([4, 7, 5, 7, 2, 1, 0, 9, 2, 4, 10, 7, 0, 5, 9], 5),
               ([10, 0, 2, 1, 13, 9, 5, 8, 3, 14, 7, 13, 0, 6, 1], 8)]


@given(tied_scores())
@example((np.ones((12, 8), np.float32), 2, 4))
@example((np.zeros((24, 8), np.float32), 4, 8))
@settings(max_examples=120, deadline=None)
def test_nm_masks_equal_torch_topk_on_tied_groups(case):
    scores, n, m = case
    got = np.asarray(M.nm_mask(jnp.asarray(scores), n, m))
    np.testing.assert_array_equal(got, reference_nm_keep(scores, n, m))
    assert (got.reshape(-1, m, scores.shape[1]).sum(axis=1) == n).all()


@given(tied_scores())
@example((np.ones((12, 8), np.float32), 2, 4))
@settings(max_examples=60, deadline=None)
def test_host_nm_selection_equals_torch_topk(case):
    """`nm_keep_host` (magnitude's N:M selection for CPU kernels: a count where no tie crosses the
    cut, the compiled replay elsewhere) equals the reference's picks, -0, inf and NaN included."""
    scores, n, m = case
    got = M.nm_keep_host(scores.reshape(-1, m, scores.shape[1]), n).reshape(scores.shape)
    np.testing.assert_array_equal(got, reference_nm_keep(scores, n, m))


@pytest.mark.parametrize("group,prune", HEAP_GROUPS)
def test_heap_selection_fallback_matches_torch(group, prune):
    m = len(group)
    scores = np.array(group, np.float32)[:, None]
    np.testing.assert_array_equal(np.asarray(M.nm_mask(jnp.asarray(scores), m - prune, m)),
                                  reference_nm_keep(scores, m - prune, m))


def test_select_and_select_count_and_jit_follow_the_same_rule():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(32, 16)).astype(np.float32)
    ref = reference_nm_keep(scores, 2, 4)
    np.testing.assert_array_equal(np.asarray(M.select(jnp.asarray(scores), 0.5, "2:4")), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda s: M.select_count(s, 16, (2, 4)))(scores)), ref)
    np.testing.assert_array_equal(np.asarray(M.nm_keep(scores.reshape(8, 4, 16), 2, axis=1)).reshape(32, 16), ref)
    # groups larger than TORCH_TIES_MAX_M keep the lower-index rule
    big = np.ones((2 * (M.TORCH_TIES_MAX_M + 4), 3), np.float32)
    m = M.TORCH_TIES_MAX_M + 4
    np.testing.assert_array_equal(np.asarray(M.nm_mask(jnp.asarray(big), m // 2, m)), old_rule_keep(big, m // 2, m))


def test_no_tie_means_no_change():
    """Distinct scores: every rule keeps the N largest."""
    rng = np.random.default_rng(1)
    scores = rng.permutation(64 * 8).reshape(64, 8).astype(np.float32)
    for n, m in [(2, 4), (4, 8), (8, 16)]:
        got = np.asarray(M.nm_mask(jnp.asarray(scores), n, m))
        np.testing.assert_array_equal(got, old_rule_keep(scores, n, m))
        np.testing.assert_array_equal(got, reference_nm_keep(scores, n, m))


def test_sparsegpt_nm_groups_follow_the_same_rule():
    """The reference's SparseGPT picks each N:M group with torch.topk(W**2 / diag(Hinv)**2,
    prune_n, largest=False) too. With H = I nothing propagates (the upper factor is diagonal),
    so on integer weights its scores tie as |W| does and the mask is the reference's topk mask."""
    rng = np.random.default_rng(2)
    w = rng.integers(-2, 3, size=(64, 24)).astype(np.float32)
    for n, m in [(2, 4), (4, 8)]:
        new_w, keep = prune_kernel(jnp.asarray(w), jnp.eye(64, dtype=jnp.float32), nm=(n, m), blocksize=32)
        ref = reference_nm_keep(w ** 2, n, m)
        np.testing.assert_array_equal(np.asarray(keep), ref)
        np.testing.assert_array_equal(np.asarray(new_w), np.where(ref, w, 0))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16), (5, 12)])
def test_nm_inside_a_user_shard_map(n, m):
    """Inside a user's shard_map (here over one device; tests/multidevice runs eight) the values
    are typed as varying across the mesh axis: N:M selection and SparseGPT's N:M path trace and
    give the masks they give outside (the first version of nm_keep looped from constant carries,
    whose type then differed from the loop body's)."""
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(1, 3 * m, 8)).astype(np.float32)
    mesh = jax.make_mesh((1,), ("d",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))
    f = jax.jit(jax.shard_map(lambda s: M.select_count(s[0], 0, (n, m))[None], mesh=mesh, in_specs=P("d"),
                              out_specs=P("d")))
    np.testing.assert_array_equal(np.asarray(f(put(scores)))[0], reference_nm_keep(scores[0], n, m))
    h = np.eye(3 * m, dtype=np.float32)[None]
    g = jax.jit(jax.shard_map(lambda w, h: jax.tree.map(lambda a: a[None], prune_kernel(w[0], h[0], nm=(n, m), blocksize=m)),
                              mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    np.testing.assert_array_equal(np.asarray(g(put(scores), put(h))[1])[0], reference_nm_keep(scores[0] ** 2, n, m))


@pytest.mark.slow
def test_smollm2_q4_1_magnitude_2_4_and_4_8_equal_the_reference():
    """Magnitude 2:4 and 4:8 on SmolLM2's Q4_1 weights (few distinct values: ties everywhere)
    equal the reference's masks on every prunable matrix, and differ from the old rule."""
    params = jp.load("smollm2-135m")
    leaves = jax.tree.leaves(params)
    for pattern in ("2:4", "4:8"):
        n, m = (int(x) for x in pattern.split(":"))
        t = time.time()
        masks = jax.tree.leaves(jp.magnitude(params, sparsity=0.5, pattern=pattern))
        elapsed = time.time() - t
        checked = old_differs = 0
        for w, keep in zip(leaves, masks):
            keep = np.asarray(keep)
            if keep.all():  # not pruned (norms, embeddings)
                continue
            scores = np.abs(np.asarray(w, np.float32))
            np.testing.assert_array_equal(keep, reference_nm_keep(scores, n, m), err_msg=f"{pattern} {w.shape}")
            old_differs += int((old_rule_keep(scores, n, m) != keep).any())
            checked += 1
        assert checked == 30 * 7, checked  # q, k, v, o, gate, up, down of 30 layers
        assert old_differs == checked  # ties are common: the old rule would fail every matrix
        assert elapsed < 120
