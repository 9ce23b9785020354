"""Mask pytrees: selection (per output row, per layer, global, N:M), apply, summary.

Axis convention: dense kernels are `[in, out]`. An *output row* (Wanda's
comparison group) is therefore a column `kernel[:, j]`, and N:M groups run along
the input axis (axis 0): every M consecutive inputs of one output keep N.

Selections keep an exact count: `int(n * sparsity)` entries of each comparison
group are pruned (M - N of every N:M group), so quantized weights with many equal
values still hit the target, and ties are broken deterministically, the way the
reference (locuslab/wanda) breaks them:

- Per output row, per layer, global: among equal scores the lower index is
  pruned first (the higher kept), as the reference's stable ascending sort does.
- N:M: exactly the M - N entries of each group that the reference's
  `torch.topk(group, M - N, largest=False)` prunes on CPU. That choice follows
  no simple index rule: torch runs libstdc++'s `std::nth_element` on the group's
  (value, index) pairs (introselect: median-of-three quickselect partitions,
  then an insertion sort of the last <= 3 entries, heap selection if its depth
  limit runs out), so which of several equal scores is pruned depends on the
  positions and values of the whole group. Groups of 2 or 3 prune the lower
  index first; four equal scores at 2:4 prune indices 2 and 3, at 1:4 indices
  0, 2 and 3; [3, 3, 1, 3] at 2:4 prunes 2 and 3; [0, 1, 1, 1] at 2:4 prunes 0
  and 2. `nm_keep` replays that algorithm for groups of up to 16
  (`TORCH_TIES_MAX_M`, which covers 2:4, 4:8 and 8:16); larger groups use the
  lower-index rule. (torch's CUDA topk may choose differently among ties.)

A mask pytree has the structure of the params: a bool array of the same shape
for every leaf, `True` = keep. Leaves that are not pruned get all-`True` masks
(explicit, never silently absent).

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1., -4.], [3., 0.5], [-2., 2.], [0.1, 1.]])   # [in=4, out=2]
    >>> per_output_mask(jnp.abs(w), 0.5).astype(int).T.tolist()
    [[0, 1, 1, 0], [1, 0, 1, 0]]
    >>> nm_mask(jnp.abs(w), 1, 2).astype(int).T.tolist()
    [[0, 1, 1, 0], [1, 0, 1, 0]]
    >>> nm_mask(jnp.ones((4, 1)), 2, 4).astype(int).T.tolist()   # ties: torch.topk's choice
    [[1, 1, 0, 0]]
    >>> nm_mask(jnp.array([[3.], [3.], [1.], [3.]]), 2, 4).astype(int).T.tolist()
    [[1, 1, 0, 0]]
"""

from __future__ import annotations

import functools
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.checks import is_real_dtype as _is_real_dtype
from jaxprune.errors import InvalidArgumentError


def _show(x, limit: int = 80) -> str:
    """A short repr of a user's value for an error message."""
    try:
        r = repr(x)
    except Exception:  # e.g. an int too long to print
        r = f"<{type(x).__name__}>"
    return r if len(r) <= limit else r[:limit] + "..."


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating, np.integer)):
        raise InvalidArgumentError(f"sparsity must be a number in [0, 1), got {_show(sparsity)}")
    try:
        s = float(sparsity)
    except OverflowError:
        s = float("inf")
    if not 0.0 <= s < 1.0 or s != s:
        raise InvalidArgumentError(f"sparsity must lie in [0, 1), got {_show(sparsity)}")
    return s


def parse_pattern(pattern) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive inputs. None/'unstructured' -> None."""
    if pattern is None or (isinstance(pattern, str) and pattern == "unstructured"):
        return None
    if isinstance(pattern, tuple) and len(pattern) == 2:
        n, m = pattern
        if not (_is_int(n) and _is_int(m)):
            raise InvalidArgumentError(f"an N:M pattern tuple needs two integers, got {_show(pattern)}")
        n, m = int(n), int(m)
    else:
        match = re.fullmatch(r"\s*([0-9]{1,9})\s*:\s*([0-9]{1,9})\s*", pattern) if isinstance(pattern, str) else None
        if not match:
            raise InvalidArgumentError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {_show(pattern)}")
        n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise InvalidArgumentError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    return n, m


def check_scores(scores, min_ndim: int = 0, what: str = "scores"):
    """`scores` as an array of real numbers with at least `min_ndim` axes (InvalidArgumentError if not).

    Static checks only (shape and dtype), so a traced array passes through. Host arrays of a
    64-bit type are cast to float32 on the host (JAX without x64 would wrap large int64 values)."""
    if not isinstance(scores, jax.Array):
        try:
            scores = np.asarray(scores)
        except Exception:
            raise InvalidArgumentError(f"{what} must be an array of real numbers, got {type(scores).__name__}") from None
    if not _is_real_dtype(scores.dtype):
        raise InvalidArgumentError(f"{what} must be an array of real numbers, got dtype {scores.dtype}")
    if scores.ndim < min_ndim:
        raise InvalidArgumentError(f"{what} need at least {min_ndim} axis(es), got shape {tuple(scores.shape)}")
    if isinstance(scores, np.ndarray) and scores.dtype.itemsize == 8:
        with np.errstate(over="ignore"):
            scores = scores.astype(np.float32)
    return scores


def _sortable_key(x):
    """int32 keys with the same order as the float32 values (finite values)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def kth_smallest_key(key, k):
    """Per row (last axis) the sortable key of the k-th smallest entry (1-based), by bisection
    over the 32-bit key range: 32 vectorised passes, no sort."""
    lo = jnp.min(key, axis=-1, keepdims=True)
    hi = jnp.max(key, axis=-1, keepdims=True)

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        enough = jnp.sum(key <= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return lo


def keep_top(scores, keep, axis: int = -1):
    """Bool mask keeping the `keep` largest scores along `axis` (ties: the lower index is pruned).

    Exact count for any `keep` (which may be traced). Finds the largest pruned value by
    bisection (no sort: ~10x faster than argsort on CPU), then splits ties by index.
    """
    if jnp.shape(scores)[axis] == 0:  # empty comparison groups: nothing to select
        return jnp.ones(jnp.shape(scores), bool)
    key = _sortable_key(jnp.moveaxis(scores, axis, -1))
    n = key.shape[-1]
    n_prune = n - keep
    v = kth_smallest_key(key, jnp.maximum(n_prune, 1))
    less = key < v
    eq = key == v
    need = n_prune - jnp.sum(less, axis=-1, keepdims=True)
    upto = jnp.cumsum(eq, axis=-1, dtype=jnp.int32)  # ties at index <= j
    prune = (less | (eq & (upto <= need))) & (n_prune > 0)
    return jnp.moveaxis(~prune, -1, axis)


def on_host(x) -> bool:
    """True for numpy arrays and for jax arrays held whole by one CPU device: selections over those
    run on the host (`keep_top_host`), where numpy's introselect beats a compiled bisection."""
    if isinstance(x, np.ndarray):
        return True
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    try:
        devices = x.devices()
    except Exception:   # deleted or otherwise unreadable arrays: leave them to the compiled path
        return False
    return len(devices) == 1 and next(iter(devices)).platform == "cpu" and x.is_fully_addressable


def host_view(x) -> np.ndarray:
    """A read-only numpy view of a host array (no copy for a CPU jax array)."""
    if isinstance(x, jax.Array):
        try:
            return np.from_dlpack(x)
        except Exception:   # dtypes numpy's DLPack import lacks (bfloat16): a copy
            return np.asarray(x)
    return np.asarray(x)


def keep_top_host(scores, keep: int, axis: int = -1, key=None) -> np.ndarray:
    """`keep_top` on the host: the same mask (same count, same tie rule: among equal scores the lower
    index is pruned), found by numpy's introselect (`np.partition`, O(n)) instead of 32 compiled
    bisection passes: several times faster on a CPU. `keep` is a Python int; `key` (optional) the
    scores' `_sortable_key` as int32, when the caller has it cheaper.

    Example:
        >>> keep_top_host(np.array([3., 1., 2., 1.]), 2).tolist()
        [True, False, True, False]
    """
    shape = np.shape(scores) if key is None else np.shape(key)
    if key is None:
        x = np.ascontiguousarray(np.moveaxis(np.asarray(scores, np.float32), axis, -1))
        bits = x.view(np.int32)
        key = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))   # as _sortable_key
    else:
        key = np.moveaxis(key, axis, -1)
    n = key.shape[-1]
    n_prune = n - int(keep)
    if n == 0 or n_prune <= 0:
        return np.ones(shape, bool)
    v = np.partition(key, n_prune - 1, axis=-1)[..., n_prune - 1:n_prune]
    if key.ndim == 1:
        kept = key > v
        ties = np.flatnonzero(key == v)
        need = n_prune - (n - int(np.count_nonzero(kept)) - len(ties))   # ties to prune, lowest index first
        kept[ties[need:]] = True
        return kept
    prune = key <= v
    extra = prune.sum(axis=-1, keepdims=True) - n_prune   # ties at v beyond the count: keep the highest
    if np.any(extra):
        eq = key == v
        n_eq = eq.sum(axis=-1, keepdims=True)
        upto = np.cumsum(eq, axis=-1)
        prune &= ~(eq & (upto > n_eq - extra))
    return np.moveaxis(~prune, -1, axis)


TORCH_TIES_MAX_M = 16  # N:M groups up to this size replay torch's CPU topk; larger ones use keep_top


def _torch_key(x):
    """int32 keys that order float32 values as torch's CPU topk compares them: -0 equals +0, and
    every NaN equals every other NaN and lies above +inf."""
    x = x.astype(jnp.float32)
    key = _sortable_key(jnp.where(x == 0, jnp.zeros((), jnp.float32), x))
    return jnp.where(jnp.isnan(x), jnp.int32(0x7FFFFFFF), key)


def _gather(a, src):
    """a[g, src[g, ...]] for every group g (int32 a [G, M]; src [G] or [G, M]), by one-hot max:
    faster on CPU than a gather for these short rows."""
    slots = jnp.arange(a.shape[1], dtype=jnp.int32)
    hit = src[..., None] == slots
    return jnp.max(jnp.where(hit, a[:, None, :] if src.ndim == 2 else a, jnp.iinfo(jnp.int32).min), axis=-1)


def _partition(key, idx, first, last, nth: int):
    """One step of libstdc++'s introselect loop (std::nth_element) on every group that has more
    than 3 entries left in [first, last). `key` [G, M]: the values' sortable keys, slot by slot;
    `idx` [G, M]: which entry of the group each slot holds; `first`, `last` [G].

    The median of slots first + 1, (first + last) / 2 and last - 1 is swapped to `first` and is
    the pivot; the unguarded Hoare partition of [first + 1, last) follows, in closed form: its
    left scan stops at entries >= pivot, its right scan at entries <= pivot, and it swaps the k-th
    left stop with the k-th right stop while the former lies left of the latter (K swaps); the cut
    it returns is the (K+1)-th left stop or the K-th right stop, whichever is further left.
    [first, last) then narrows to the side of the cut that holds `nth`."""
    m = key.shape[1]
    slots = jnp.arange(m, dtype=jnp.int32)[None]
    active = last - first > 3
    a, b, c = jnp.minimum(first + 1, m - 1), first + (last - first) // 2, jnp.maximum(last - 1, 0)
    va, vb, vc = _gather(key, a), _gather(key, b), _gather(key, c)
    med = jnp.where(va < vb, jnp.where(vb < vc, b, jnp.where(va < vc, c, a)),
                    jnp.where(va < vc, a, jnp.where(vb < vc, c, b)))

    def swap(x):
        at_first, at_med = _gather(x, first)[:, None], _gather(x, med)[:, None]
        return jnp.where(slots == first[:, None], at_med, jnp.where(slots == med[:, None], at_first, x))

    key1, idx1 = swap(key), swap(idx)
    pivot = _gather(key1, first)[:, None]
    inside = (slots > first[:, None]) & (slots < last[:, None])
    ge = inside & ~(key1 < pivot)  # left-scan stops
    le = inside & ~(pivot < key1)  # right-scan stops
    cl = jnp.cumsum(ge, axis=1, dtype=jnp.int32)  # left stops at slots <= j
    cr = jnp.cumsum(le[:, ::-1], axis=1, dtype=jnp.int32)[:, ::-1]  # right stops at slots >= j
    ks = jnp.arange(1, m + 1, dtype=jnp.int32)[None, :, None]
    lpos = jnp.sum(cl[:, None, :] < ks, axis=2, dtype=jnp.int32)  # slot of the k-th left stop (m: none)
    rpos = jnp.sum(cr[:, None, :] >= ks, axis=2, dtype=jnp.int32) - 1  # of the k-th right stop (-1: none)
    nswap = jnp.sum(lpos < rpos, axis=1, dtype=jnp.int32)
    swapped = nswap[:, None]
    src = jnp.where(ge & (cl <= swapped), _gather(rpos, jnp.maximum(cl - 1, 0)),
                    jnp.where(le & (cr <= swapped), _gather(lpos, jnp.maximum(cr - 1, 0)), slots))
    still = ~active[:, None]
    key = jnp.where(still, key, _gather(key1, src))
    idx = jnp.where(still, idx, _gather(idx1, src))
    cut = jnp.minimum(_gather(lpos, jnp.minimum(nswap, m - 1)),
                      jnp.where(nswap > 0, _gather(rpos, jnp.maximum(nswap - 1, 0)), m))
    return key, idx, jnp.where(active & (cut <= nth), cut, first), jnp.where(active & (cut > nth), cut, last)


def _put(a, pos, val, on):
    """a with a[g, pos[g]] = val[g] where on[g] (int32 a [G, M]; pos, val, on [G])."""
    slots = jnp.arange(a.shape[1], dtype=jnp.int32)[None]
    return jnp.where(on[:, None] & (slots == pos[:, None]), val[:, None], a)


def _adjust_heap(key, idx, first, ln, hole, value, on, depth: int):
    """libstdc++'s __adjust_heap(first, hole, ln, value), then its __push_heap, on every group
    where `on` (a max-heap of keys in slots [first, first + ln); per-group [G] first, ln, hole;
    value = (key, idx) [G] each). Loop-free: both walks run `depth` masked steps (static), enough
    for a heap of fewer than 2**depth entries."""
    top, child = hole, hole
    for _ in range(depth):  # while child < (ln - 1) / 2: the hole moves to its larger child
        go = on & (child < (ln - 1) // 2)
        second = 2 * (child + 1)
        second = jnp.where(_gather(key, first + second) < _gather(key, first + second - 1), second - 1, second)
        key = _put(key, first + hole, _gather(key, first + second), go)
        idx = _put(idx, first + hole, _gather(idx, first + second), go)
        hole, child = jnp.where(go, second, hole), jnp.where(go, second, child)
    odd = on & ((ln & 1) == 0) & (child == (ln - 2) // 2)  # a last parent with a single child
    key = _put(key, first + hole, _gather(key, first + 2 * child + 1), odd)
    idx = _put(idx, first + hole, _gather(idx, first + 2 * child + 1), odd)
    hole = jnp.where(odd, 2 * child + 1, hole)
    for _ in range(depth):  # __push_heap: while hole > top and heap[parent] < value, move up
        parent = jnp.maximum(hole - 1, 0) // 2
        go = on & (hole > top) & (_gather(key, first + parent) < value[0])
        key = _put(key, first + hole, _gather(key, first + parent), go)
        idx = _put(idx, first + hole, _gather(idx, first + parent), go)
        hole = jnp.where(go, parent, hole)
    return _put(key, first + hole, value[0], on), _put(idx, first + hole, value[1], on)


def _heap_select(key, idx, first, last, mid: int, on):
    """libstdc++'s __heap_select(first, mid, last) on every group where `on` (`mid` static, the
    same for all groups; per-group [G] first, last): __make_heap on [first, mid), then every
    entry of [mid, last) below the heap's top replaces it (__pop_heap). Returns the new idx.

    Two fori_loops over static bounds, carrying (key, idx): `key`, `idx`, `first`, `last` and
    `on` all come from the partition loop on the group keys, so they share one type (e.g.
    varying across a user's shard_map axis) and the carry keeps the type the bodies return."""
    m = key.shape[1]
    ln = mid - first  # <= mid: the heap has fewer than 2**depth entries
    depth = mid.bit_length()

    def make(j, kv):  # __make_heap: parents (ln - 2) // 2 down to 0 (none when ln < 2)
        key, idx = kv
        parent = (ln - 2) // 2 - j
        go = on & (ln >= 2) & (parent >= 0)
        p = jnp.maximum(parent, 0)
        return _adjust_heap(key, idx, first, ln, p, (_gather(key, first + p), _gather(idx, first + p)), go, depth)

    def scan(i, kv):  # slot i in [mid, last): pop the top if key[i] < top
        key, idx = kv
        at_i = jnp.full_like(first, i)
        go = on & (i < last) & (_gather(key, at_i) < _gather(key, first))
        value = (_gather(key, at_i), _gather(idx, at_i))
        key = _put(key, at_i, _gather(key, first), go)
        idx = _put(idx, at_i, _gather(idx, first), go)
        return _adjust_heap(key, idx, first, ln, jnp.zeros_like(first), value, go, depth)

    kv = jax.lax.fori_loop(0, mid // 2, make, (key, idx))
    return jax.lax.fori_loop(mid, m, scan, kv)[1]


@functools.partial(jax.jit, static_argnums=1)
def _topk_smallest(key, k: int):
    """Which `k` entries of each group `torch.topk(group, k, largest=False)` returns on CPU.

    `key` [G, M]: sortable keys, one group per row (M <= 16); `k`: static, 1..M-1. Returns a bool
    [G, M]. torch copies each group into a vector of (value, index) pairs and calls libstdc++'s
    `std::nth_element(begin, begin + k - 1, end)`; its first k pairs are the answer. This replays
    that on all groups at once: introselect's partitions (a fixed number of vectorised steps in a
    fori_loop), then the stable insertion sort of the <= 3 entries left or, where the depth limit
    2 floor(log2 M) runs out first (possible for M >= 10, rare), libstdc++'s heap selection.

    Every loop carry starts from values built from `key`: inside a user's shard_map the body's
    results vary across the mesh axis like `key`, and a carry started from constants (an
    arange, zeros) would not, a type error (issue #21's first attempt)."""
    g, m = key.shape
    slots = jnp.arange(m, dtype=jnp.int32)[None]
    # the initial idx, first and last are built from key (zeros_like keeps its type, e.g. varying
    # across a user's shard_map axis), so they have the type the loop body returns
    idx = jnp.zeros_like(key) + slots
    first = jnp.zeros_like(key[:, 0])
    last = first + m
    steps = min(2 * (m.bit_length() - 1), max(m - 3, 0))  # each partition narrows [first, last) by >= 1
    key, idx, first, last = jax.lax.fori_loop(0, steps, lambda _, s: _partition(*s, k - 1), (key, idx, first, last))
    # insertion sort of [first, last), a stable sort: the entry in slot p lands at first + its rank there
    inside = (slots >= first[:, None]) & (slots < last[:, None])
    before = (key[:, None, :] < key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & (slots[:, None] < slots[..., None]))
    rank = jnp.sum(before & inside[:, None, :], axis=2, dtype=jnp.int32)
    chosen = (slots < first[:, None]) | (inside & (first[:, None] + rank < k))
    if steps < m - 3:  # the depth limit may run out: __heap_select(first, begin + k, last) there
        heap = last - first > 3
        heaped = jax.lax.cond(jnp.any(heap), lambda key, idx: _heap_select(key, idx, first, last, k, heap),
                              lambda key, idx: idx, key, idx)
        idx = jnp.where(heap[:, None], heaped, idx)
        chosen = jnp.where(heap[:, None], slots < k, chosen)
    return jnp.any((idx[:, :, None] == slots[:, None]) & chosen[:, :, None], axis=1)


def nm_keep(scores, n: int, axis: int = 0):
    """Bool mask keeping `n` of the M entries along `axis` (M = its length, `n` a static int in
    1..M-1): for M <= 16 the complement of the M - n entries `torch.topk(group, M - n,
    largest=False)` picks on CPU, ties included (values compared as float32); for larger M,
    `keep_top`'s rule (ties: the lower index is pruned). See the module docstring."""
    m = jnp.shape(scores)[axis]
    if m > TORCH_TIES_MAX_M:
        return keep_top(scores, n, axis=axis)
    if jnp.size(scores) == 0:
        return jnp.ones(jnp.shape(scores), bool)
    s = jnp.moveaxis(jnp.asarray(scores), axis, -1)
    pruned = _topk_smallest(_torch_key(s).reshape(-1, m), m - n).reshape(s.shape)
    return jnp.moveaxis(~pruned, -1, axis)


# Tied groups replayed on the host in pieces of this many groups: one compilation per pattern.
NM_HOST_ROWS = 1 << 14


@partial(jax.jit, static_argnames="n")
def _nm_rows(groups, n: int):
    return nm_keep(groups, n, axis=1)


def nm_keep_host(groups: np.ndarray, n: int) -> np.ndarray:
    """`nm_keep(groups, n, axis=1)` for a numpy array [G, M, R] (groups of M <= 16 along axis 1, as in
    a kernel [in, out] reshaped to [in / M, M, out]), on the host.

    A group whose (M - n)-th and (M - n + 1)-th smallest scores differ has one answer, found by
    counting, for each entry, the entries below it (M vectorised comparisons); only groups tied
    across that cut need torch's tie rule, and those are replayed by the compiled `nm_keep` in
    fixed-shape pieces (one compilation per pattern, whatever the matrix).

    Example:
        >>> g = np.array([[4., 1., 3., 2.], [1., 1., 1., 1.]], np.float32)[:, :, None]
        >>> nm_keep_host(g, 2)[:, :, 0].tolist()
        [[True, False, True, False], [True, True, False, False]]
    """
    m = groups.shape[1]
    k = m - n
    x = np.asarray(groups, np.float32) + np.float32(0)   # -0 becomes +0 (torch compares them equal)
    below = np.zeros(x.shape, np.int8)      # entries of the group scoring below this one
    not_above = np.zeros(x.shape, np.int8)  # ... at or below it (itself included)
    for j in range(m):
        other = x[:, j:j + 1]
        below += other < x
        not_above += other <= x
    keep = below >= k                          # the k smallest pruned, where no tie crosses the cut
    tied = ((below < k) & (not_above > k)).any(axis=1) | np.isnan(x).any(axis=1)   # NaN: torch's rule too
    g_idx, r_idx = np.nonzero(tied)
    for s in range(0, len(g_idx), NM_HOST_ROWS):
        gi, ri = g_idx[s:s + NM_HOST_ROWS], r_idx[s:s + NM_HOST_ROWS]
        piece = np.zeros((NM_HOST_ROWS, m), np.float32)
        piece[:len(gi)] = x[gi, :, ri]
        keep[gi, :, ri] = np.asarray(_nm_rows(piece, n))[:len(gi)]
    return keep


def n_pruned(n: int, sparsity: float) -> int:
    """How many of `n` entries a group at `sparsity` prunes (the reference's int(n * s))."""
    return int(n * sparsity)


def per_output_mask(scores, sparsity: float):
    """Keep the top (1 - sparsity) of each output's inputs: scores [in, out] (Wanda's rows)."""
    scores, sparsity = check_scores(scores, 1), check_sparsity(sparsity)
    return keep_top(scores, scores.shape[0] - n_pruned(scores.shape[0], sparsity), axis=0)


def per_layer_mask(scores, sparsity: float):
    """Keep the top (1 - sparsity) of the whole tensor."""
    scores, sparsity = check_scores(scores), check_sparsity(sparsity)
    return keep_top(scores.reshape(-1), scores.size - n_pruned(scores.size, sparsity)).reshape(scores.shape)


def group_size(shape, scope: str) -> int:
    """Entries per comparison group: the input size for 'row' (2-D kernels), else the tensor size."""
    return shape[0] if scope == "row" and len(shape) == 2 else int(np.prod(shape))


def select_count(scores, n_prune, nm=None, scope: str = "row"):
    """Like `select`, with the number pruned per group given (may be traced: one compilation
    serves every sparsity)."""
    if nm is not None:
        return nm_mask(scores, *nm)
    if scope == "row" and scores.ndim == 2:
        return keep_top(scores, scores.shape[0] - n_prune, axis=0)
    return keep_top(scores.reshape(-1), scores.size - n_prune).reshape(scores.shape)


def nm_mask(scores, n: int, m: int):
    """Keep the N largest of every M consecutive inputs (axis 0) of each output; among equal scores
    the M - N pruned are those the reference's `torch.topk` prunes (see the module docstring)."""
    n, m = parse_pattern((n, m))
    scores = check_scores(scores, 1)
    n_in = scores.shape[0]
    if n_in % m:
        raise InvalidArgumentError(f"N:M pattern {n}:{m}: M={m} does not divide the input size {n_in}")
    grouped = scores.reshape(n_in // m, m, *scores.shape[1:])
    return nm_keep(grouped, n, axis=1).reshape(scores.shape)


def select(scores, sparsity: float, pattern=None, scope: str = "row"):
    """One tensor's mask: N:M if `pattern`, else per output row ('row') or per tensor ('layer')."""
    nm = parse_pattern(pattern)
    if not (isinstance(scope, str) and scope in ("row", "layer")):
        raise InvalidArgumentError(f"scope must be 'row' or 'layer' (for 'global' use global_masks), got "
                                   f"{_show(scope)}")
    if nm is not None:
        return nm_mask(scores, *nm)
    scores = check_scores(scores)
    if scope == "row" and scores.ndim == 2:
        return per_output_mask(scores, sparsity)
    return per_layer_mask(scores, sparsity)


def global_masks(score_tree, sparsity: float):
    """Masks keeping the top (1 - sparsity) of all scores in `score_tree` together."""
    sparsity = check_sparsity(sparsity)
    paths, treedef = jax.tree_util.tree_flatten_with_path(score_tree)
    leaves = [check_scores(x, what=f"scores {jax.tree_util.keystr(p)}") for p, x in paths]
    if not leaves:
        return jax.tree.unflatten(treedef, [])
    sizes = [x.size for x in leaves]
    flat = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in leaves])
    keep = keep_top(flat, flat.size - n_pruned(flat.size, sparsity))
    out, start = [], 0
    for x, n in zip(leaves, sizes):
        out.append(keep[start:start + n].reshape(x.shape))
        start += n
    return jax.tree.unflatten(treedef, out)


@jax.jit
def _ones_like_tree(params):
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)


def full_masks(params):
    """All-keep masks shaped like `params` (one compiled call for the whole tree, not one per leaf)."""
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
        return _ones_like_tree(params)
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)


def _dtype(x):
    dtype = getattr(x, "dtype", None)
    if dtype is None and isinstance(x, (bool, int, float, np.generic)):
        dtype = np.asarray(x).dtype
    return dtype


def mask_mismatch(params, masks, scalar_ok: bool = False) -> str | None:
    """Why `masks` is not a boolean pytree shaped like `params` (None when it is).

    Static checks only (tree structure, shapes, dtypes): safe on traced arrays. With
    `scalar_ok`, a plain Python/numpy bool leaf stands for a whole tensor."""
    pt, mt = jax.tree.structure(params), jax.tree.structure(masks)
    if pt != mt:
        p_paths = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        m_paths = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(masks)[0]}
        only_p, only_m = sorted(p_paths - m_paths)[:3], sorted(m_paths - p_paths)[:3]
        if only_p or only_m:
            return f"masks do not match params: paths only in params {only_p}, only in masks {only_m}"
        if type(params) is not type(masks):
            return (f"masks do not match params: the containers differ ({type(masks).__name__} masks for "
                    f"{type(params).__name__} params)")
        return f"masks do not match params: tree structures differ ({_show(mt, 300)} vs {_show(pt, 300)})"
    for (path, p), m in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(masks)):
        name = jax.tree_util.keystr(path)
        if not _is_real_dtype(getattr(p, "dtype", None)):
            return f"params {name} must be an array of real numbers, got {type(p).__name__} {getattr(p, 'dtype', '')}"
        if _dtype(m) != np.bool_:
            return f"mask {name} must be boolean (True = keep), got {type(m).__name__} {_dtype(m)}"
        if scalar_ok and isinstance(m, (bool, np.bool_)):
            continue
        if jnp.shape(m) != jnp.shape(p):
            return f"mask {name} has shape {jnp.shape(m)}, params have {jnp.shape(p)}"
    return None


def check_masks_like(params, masks) -> None:
    """InvalidArgumentError unless `masks` is a boolean pytree of the same kind and shapes as `params`
    (what the writers `jp.save`, `jp.save_compressed` and `jp.save_checkpoint` accept)."""
    err = (f"got {type(masks).__name__}, not {type(params).__name__}" if type(masks) is not type(params)
           else mask_mismatch(params, masks))
    if err:
        raise InvalidArgumentError("masks must be shaped like params (the pytree jp.wanda / jp.magnitude / "
                                   f"jp.sparsegpt return): {err}")


def apply_masks(params, masks):
    """Zero every pruned weight: `where(mask, param, 0)` leaf by leaf. Idempotent.

    Example:
        >>> import jax.numpy as jnp
        >>> apply_masks({"w": jnp.array([1., 2.])}, {"w": jnp.array([True, False])})["w"].tolist()
        [1.0, 0.0]
    """
    err = mask_mismatch(params, masks)
    if err:
        raise InvalidArgumentError(err)
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.result_type(p))), params, masks)


def summary(masks, prunable=None) -> dict:
    """Sparsity per leaf and overall.

    Returns {"layers": {path: {"size", "zeros", "sparsity"}}, "pruned_size", "pruned_zeros",
    "pruned_sparsity" (over leaves with any zero, or over `prunable(path)` leaves),
    "total_size", "total_zeros", "total_sparsity"}.
    """
    rows = {}
    tot = tot_z = pr = pr_z = 0
    for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
        name = jax.tree_util.keystr(path)
        if not _is_real_dtype(_dtype(m)):
            raise InvalidArgumentError(f"mask {name} must be a boolean (or numeric) array, got "
                                       f"{type(m).__name__} {_dtype(m)}")
        size = int(np.size(m))
        zeros = size - int(np.count_nonzero(np.asarray(m)))
        rows[name] = {"size": size, "zeros": zeros, "sparsity": zeros / max(size, 1)}
        tot += size
        tot_z += zeros
        is_pruned = prunable(path) if prunable is not None else zeros > 0
        if is_pruned:
            pr += size
            pr_z += zeros
    return {"layers": rows, "pruned_size": pr, "pruned_zeros": pr_z, "pruned_sparsity": pr_z / max(pr, 1),
            "total_size": tot, "total_zeros": tot_z, "total_sparsity": tot_z / max(tot, 1)}
