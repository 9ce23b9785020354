"""Fuzz the public mask functions with arbitrary inputs: each call either succeeds (and then its
result satisfies the basic invariants) or raises a `jaxprune.JaxpruneError` — never another
exception. Shapes come from a small pool (0-sized, 1-D, 2-D, 3-D) and valid sparsities from
a few values, so the selections compile once per shape and the file stays fast."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import jaxprune as jp
from jaxprune.sparsity import masks as M
from jaxprune.errors import JaxpruneError

# jnp.asarray of a float64 array drawn with huge values overflows float32 (in this file, not the library)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
# jp.magnitude / jp.wanda re-jit per call (~1-2 s on 2 CPU cores when the inputs are valid)
FEW = settings(FUZZ, max_examples=20)

SHAPES = [(), (0,), (5,), (4, 3), (0, 3), (3, 0), (8, 2), (2, 3, 2)]
DTYPES = [np.float32, np.float32, np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_,
          np.complex64, "U2"]
ODD = [None, "abc", b"2:4", [1.0, 2.0], [[1, 2], [3]], {"a": 1}, 3.5, True, object()]


@st.composite
def any_array(draw, shapes=SHAPES, dtypes=DTYPES):
    """A numpy or jax array of a pool shape and an arbitrary dtype (NaN/Inf included), or an odd value."""
    kind = draw(st.sampled_from(["numpy", "numpy", "jax", "jax", "odd"]))
    if kind == "odd":
        return draw(st.sampled_from(ODD))
    a = draw(arrays(draw(st.sampled_from(dtypes)), draw(st.sampled_from(shapes))))
    if kind == "jax" and a.dtype.kind in "biufc":
        a = jnp.asarray(a)
    return a


def any_value():
    return st.one_of(st.sampled_from(ODD), st.integers(), st.floats(), st.text(max_size=4),
                     st.tuples(st.integers(-2, 9), st.integers(-2, 9)))


VALID_SPARSITY = [0.0, 0.25, 0.5, 0.9, 0, np.float32(0.5)]
sparsities = st.one_of(
    st.sampled_from(VALID_SPARSITY), st.sampled_from(VALID_SPARSITY),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0 <= x < 1),
    st.integers(-3, 3), st.integers(min_value=2), st.booleans(), any_value())
patterns = st.one_of(
    st.none(), st.just("unstructured"), st.sampled_from(["1:2", "2:4", "4:8", "1:4", "3:4", "2:3"]),
    st.text(alphabet="0123456789: -x\u0663", max_size=6),
    st.tuples(st.integers(-2, 9), st.integers(-2, 9)), st.tuples(st.floats(), st.integers()),
    st.tuples(st.booleans(), st.integers(0, 3)), st.tuples(st.integers(), st.integers(), st.integers()),
    st.just(np.array([2, 4])), st.just((np.int64(2), np.int64(4))), any_value())
scopes = st.one_of(st.sampled_from(["row", "layer", "global"]), st.text(max_size=5), any_value(),
                   st.just(np.array(["row", "layer"])))


def attempt(fn, *args, **kwargs):
    """fn(...) or None when it raised a JaxpruneError; any other exception fails the test."""
    try:
        out = fn(*args, **kwargs)
    except JaxpruneError as e:
        event(f"rejected: {type(e).__name__}")
        return None
    event("accepted")
    return out


def valid_sparsity(s) -> bool:
    try:
        return M.check_sparsity(s) is not None
    except JaxpruneError:
        return False


def check_mask(mask, scores):
    mask = np.asarray(mask)
    assert mask.dtype == np.bool_ and mask.shape == np.shape(scores)
    return mask


# ----------------------------------------------------------------------------- validators

@given(sparsities)
@FUZZ
def test_check_sparsity(s):
    got = attempt(M.check_sparsity, s)
    if got is not None:
        assert isinstance(got, float) and 0.0 <= got < 1.0


@given(patterns)
@FUZZ
def test_parse_pattern(pattern):
    try:
        got = M.parse_pattern(pattern)
    except JaxpruneError:
        return
    if got is not None:
        n, m = got
        assert type(n) is int and type(m) is int and 0 < n < m


# ----------------------------------------------------------------------------- selections

@given(any_array(), sparsities)
@FUZZ
def test_per_output_mask(scores, sparsity):
    mask = attempt(M.per_output_mask, scores, sparsity)
    if mask is not None:
        mask = check_mask(mask, scores)
        n = mask.shape[0]
        if n:
            s = M.check_sparsity(sparsity)
            assert (mask.sum(axis=0) == n - int(n * s)).all()


@given(any_array(), sparsities)
@FUZZ
def test_per_layer_mask(scores, sparsity):
    mask = attempt(M.per_layer_mask, scores, sparsity)
    if mask is not None:
        mask = check_mask(mask, scores)
        assert mask.sum() == mask.size - int(mask.size * M.check_sparsity(sparsity))


nms = st.one_of(st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]),
                st.tuples(st.one_of(st.integers(-2, 9), any_value()), st.one_of(st.integers(-2, 9), any_value())))


@given(any_array(), nms)
@FUZZ
def test_nm_mask(scores, nm):
    n, m = nm
    mask = attempt(M.nm_mask, scores, n, m)
    if mask is not None:
        mask = check_mask(mask, scores)
        n, m = M.parse_pattern((n, m))
        groups = mask.reshape(mask.shape[0] // m, m, int(np.prod(mask.shape[1:])))
        assert (groups.sum(axis=1) == n).all()


@given(any_array(), sparsities, patterns, scopes)
@FUZZ
def test_select(scores, sparsity, pattern, scope):
    mask = attempt(M.select, scores, sparsity, pattern, scope)
    if mask is not None:
        mask = check_mask(mask, scores)
        if M.parse_pattern(pattern) is None and scope == "layer":
            assert mask.sum() == mask.size - int(mask.size * M.check_sparsity(sparsity))


trees = st.one_of(st.dictionaries(st.sampled_from("abc"), any_array(), max_size=3),
                  st.lists(any_array(), max_size=2), any_array(), st.none())


@given(trees, sparsities)
@FUZZ
def test_global_masks(tree, sparsity):
    got = attempt(M.global_masks, tree, sparsity)
    if got is not None:
        leaves, masks = jax.tree.leaves(tree), jax.tree.leaves(got)
        assert jax.tree.structure(got) == jax.tree.structure(tree)
        total = kept = 0
        for x, m in zip(leaves, masks):
            m = check_mask(m, x)
            total, kept = total + m.size, kept + int(m.sum())
        assert kept == total - int(total * M.check_sparsity(sparsity))


# ----------------------------------------------------------------------------- apply and summary

EXACT = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32), np.dtype(np.uint8), np.dtype(np.bool_)}


@st.composite
def params_and_masks(draw):
    """A dict of params and masks for it: right, wrong in one way, or arbitrary."""
    keys = draw(st.lists(st.sampled_from("abcd"), unique=True, max_size=3))
    params = {k: draw(any_array()) for k in keys}
    mode = draw(st.sampled_from(["right", "right", "one-wrong", "arbitrary"]))
    masks = {}
    for k, p in params.items():
        if mode != "arbitrary" and isinstance(p, (np.ndarray, jax.Array)):
            masks[k] = draw(arrays(np.bool_, np.shape(p)))
            if draw(st.booleans()):
                masks[k] = jnp.asarray(masks[k])
        else:
            masks[k] = draw(st.one_of(any_array(), st.booleans()))
    if mode == "one-wrong":
        wrong = draw(st.sampled_from(["missing", "extra", "leaf", "list", "none", "odd"]))
        if wrong == "missing" and masks:
            masks.pop(next(iter(masks)))
        elif wrong == "extra":
            masks["extra"] = np.ones(2, bool)
        elif wrong == "leaf" and masks:
            masks[next(iter(masks))] = draw(any_array())
        elif wrong == "list":
            masks = list(masks.values())
        elif wrong == "none":
            masks = None
        elif wrong == "odd":
            masks = draw(st.sampled_from(ODD))
    return params, masks


@given(params_and_masks())
@FUZZ
def test_apply_masks(pm):
    params, masks = pm
    got = attempt(jp.apply_masks, params, masks)
    if got is not None:
        assert set(got) == set(params)
        for k, p in params.items():
            out, m = np.asarray(got[k]), np.asarray(masks[k])
            assert out.shape == np.shape(p)
            if np.asarray(p).dtype in EXACT:
                np.testing.assert_array_equal(out, np.where(m, np.asarray(p), np.zeros((), np.asarray(p).dtype)))


@given(trees)
@FUZZ
def test_sparsity_summary(tree):
    got = attempt(jp.sparsity_summary, tree)
    if got is not None:
        sizes = [int(np.size(x)) for x in jax.tree.leaves(tree)]
        assert got["total_size"] == sum(sizes) and len(got["layers"]) == len(sizes)
        assert 0.0 <= got["total_sparsity"] <= 1.0 and 0.0 <= got["pruned_sparsity"] <= 1.0
        for row in got["layers"].values():
            assert 0 <= row["zeros"] <= row["size"]


# ----------------------------------------------------------------------------- one-shot pruning

CFG = jp.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)


@pytest.fixture(scope="module")
def tiny():
    return jp.init(CFG, jax.random.key(0))


def with_value(params, value):
    tree = jax.tree.map(lambda x: x, params.tree)
    k = tree["layers"][0]["mlp"]["gate_proj"]["kernel"]
    tree["layers"][0]["mlp"]["gate_proj"]["kernel"] = k.at[1, 2].set(value)
    return params.replace(tree)


models = st.one_of(st.sampled_from(["clean", "clean", "clean", "nan", "inf", "user-dict", "odd"]),
                   any_array(shapes=[(4, 3), (3, 0), (0, 2), (2, 2, 2), (8, 2)]).map(lambda k: ("kernel", k)))
# the valid values are few, so that jit caches hit
few_sparsities = st.one_of(st.just(0.5), st.just(0.5), sparsities)
few_patterns = st.one_of(st.sampled_from([None, "2:4"]), st.sampled_from([None, "2:4"]), patterns)
few_scopes = st.one_of(st.sampled_from(["row", "layer", "global"]), st.sampled_from(["row", "layer"]), scopes)
calibs = st.one_of(
    st.just("valid"), st.just("valid"), st.just("valid"),
    any_array(shapes=[(), (0,), (4,), (2, 8), (0, 8), (2, 9), (2, 1), (1, 2, 4)],
              dtypes=[np.int32, np.int64, np.float32, np.uint8, np.bool_, "U2"]),
    st.lists(st.lists(st.integers(-2, 20), min_size=2, max_size=3), min_size=1, max_size=2))


def model_of(kind, params):
    if isinstance(kind, tuple):   # a user's params dict holding one arbitrary kernel
        return {"dense": {"kernel": kind[1], "bias": np.zeros(3, np.float32)}}
    if kind == "nan":
        return with_value(params, np.nan)
    if kind == "inf":
        return with_value(params, -np.inf)
    if kind == "user-dict":   # a user's own Flax params dict (magnitude needs no apply_fn)
        return {"dense": {"kernel": np.asarray(params["layers"][0]["mlp"]["up_proj"]["kernel"])}}
    if kind == "odd":
        return [1.0, 2.0]
    return params


@given(models, few_sparsities, few_patterns, few_scopes)
@FEW
def test_magnitude(tiny, kind, sparsity, pattern, scope):
    params = model_of(kind, tiny)
    masks = attempt(jp.magnitude, params, sparsity, pattern=pattern, scope=scope)
    if masks is not None:
        assert isinstance(kind, tuple) or kind in ("clean", "user-dict")
        assert jax.tree.structure(masks) == jax.tree.structure(params)
        for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(params)):
            check_mask(m, p)


@given(models, calibs, few_sparsities, few_patterns, few_scopes)
@FEW
def test_wanda(tiny, kind, calib, sparsity, pattern, scope):
    params = model_of(kind, tiny)
    if isinstance(calib, str) and calib == "valid":
        calib = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 8)).astype(np.int32)
    masks = attempt(jp.wanda, params, calib, sparsity, pattern=pattern, scope=scope, show_progress=False)
    if masks is not None:
        assert kind == "clean"
        assert jax.tree.structure(masks) == jax.tree.structure(params)
        for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(params)):
            check_mask(m, p)
