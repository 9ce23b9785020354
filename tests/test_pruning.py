"""Wanda, SparseGPT and magnitude on a small Llama/OPT against references written here:
numpy selection rules on linear-layer inputs captured from transformers' PyTorch model
with forward hooks, following the reference (locuslab/wanda) layer-by-layer procedure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxprune as jp
from jaxprune.models.config import config_from_hf
from jaxprune.io.hf import from_named_arrays
from jaxprune.sparsity.sparsegpt import gram, hessian as sparsegpt_hessian, inverse_upper_factor, prune_kernel

from conftest import hf_to_named, tiny_llama, tiny_opt
from sparsegpt_reference import sparsegpt_numpy

torch = pytest.importorskip("torch")

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
OPT_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]


def decoder_layers(model):
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def capture_inputs(model, calib, layer_idx, names):
    """{name: inputs [tokens, in]} of the named linears of one layer, from a full forward."""
    layer = decoder_layers(model)[layer_idx]
    got, hooks = {}, []
    for name in names:
        mod = layer.get_submodule(name)
        hooks.append(mod.register_forward_hook(
            lambda m, inp, out, name=name: got.__setitem__(name, inp[0].detach().reshape(-1, inp[0].shape[-1]).double().numpy())))
    with torch.no_grad():
        model(torch.as_tensor(calib, dtype=torch.long))
    for h in hooks:
        h.remove()
    return got


def np_wanda_keep(W, X, sparsity):
    """W [out, in] (torch layout), X [tokens, in]: per output row, prune the first int(in * s) of
    a stable ascending sort (the reference's rule: ties prune the lower index)."""
    metric = np.abs(W) * np.sqrt((X ** 2).sum(0) / len(X))[None, :]
    n_in = W.shape[1]
    keep = np.ones_like(W, bool)
    order = np.argsort(metric, axis=1, kind="stable")
    for r in range(W.shape[0]):
        keep[r, order[r, : int(n_in * sparsity)]] = False
    return keep


def np_nm_keep(metric, n, m):
    """metric [out, in] (torch layout): in every group of m inputs prune the m - n that the
    reference's torch.topk(tmp, prune_n, dim=1, largest=False) picks (on CPU; its choice among
    equal scores is libstdc++'s nth_element order, not a stable sort: tests/test_nm_ties.py)."""
    W_metric = torch.from_numpy(np.ascontiguousarray(metric))
    pruned = torch.zeros(W_metric.shape, dtype=torch.bool)
    for ii in range(0, W_metric.shape[1], m):
        tmp = W_metric[:, ii:(ii + m)].float()
        pruned.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    return ~pruned.numpy()


def reference_prune(model, calib, names, prune, mode):
    """The reference driver: layer by layer; 'sequential' captures each layer's inputs with earlier
    layers pruned, 'as-you-go' also with earlier sublayers of the same layer pruned, 'dense' from
    the unpruned model. Returns {(layer, name): (new W [out, in], keep)}."""
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    groups = {"as-you-go": [[n] for n in names]}.get(mode, [names])
    for i in range(len(decoder_layers(model))):
        for group in groups:
            if mode == "dense":
                pruned_now = {k: v.clone() for k, v in model.state_dict().items()}
                model.load_state_dict(dense)
            X = capture_inputs(model, calib, i, group)
            if mode == "dense":
                model.load_state_dict(pruned_now)
            for name in group:
                lin = decoder_layers(model)[i].get_submodule(name)
                W = lin.weight.detach().double().numpy()
                newW, keep = prune(W, X[name])
                out[(i, name)] = (newW, keep)
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(newW).float())
    return out


def ours_params(model):
    return from_named_arrays(config_from_hf(model.config.to_dict()), hf_to_named(model))


def kernel_of(tree, i, name):
    node = tree["layers"][i]
    for part in name.split("."):
        node = node[part]
    return np.asarray(node["kernel"]).T


def calib_tokens(vocab, n=6, T=24):
    return np.random.default_rng(1).integers(0, vocab, (n, T)).astype(np.int32)


def setup(arch):
    """(torch model, its linear names, our params, calibration tokens) for a tiny model."""
    model = tiny_llama() if arch == "llama" else tiny_opt()
    params = ours_params(model)
    return model, LLAMA_LINEARS if arch == "llama" else OPT_LINEARS, params, calib_tokens(params.config.vocab_size)


@pytest.mark.parametrize("mode", ["sequential", "as-you-go", "dense"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_wanda_matches_reference(arch, mode):
    model, names, params, calib = setup(arch)
    masks = jp.wanda(params, calib, sparsity=0.5, mode=mode)

    def prune(W, X):
        keep = np_wanda_keep(W, X, 0.5)
        return np.where(keep, W, 0), keep

    ref = reference_prune(model, calib, names, prune, mode)
    for (i, name), (_, keep) in ref.items():
        np.testing.assert_array_equal(kernel_of(masks.tree, i, name).astype(bool), keep, err_msg=f"{i} {name}")


def test_wanda_2_4_and_4_8_match_reference():
    model = tiny_llama()
    params = ours_params(model)
    calib = calib_tokens(101)
    for n, m in [(2, 4), (4, 8)]:
        masks = jp.wanda(params, calib, sparsity=0.5, pattern=f"{n}:{m}")

        def prune(W, X):
            keep = np_nm_keep(np.abs(W) * np.sqrt((X ** 2).sum(0) / len(X))[None, :], n, m)
            return np.where(keep, W, 0), keep

        ref = reference_prune(tiny_llama(), calib, LLAMA_LINEARS, prune, "sequential")
        for (i, name), (_, keep) in ref.items():
            np.testing.assert_array_equal(kernel_of(masks.tree, i, name).astype(bool), keep)


@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_sparsegpt_matches_reference(arch, pattern):
    model, names, params, calib = setup(arch)
    new_params, masks = jp.sparsegpt(params, calib, sparsity=0.5, pattern=pattern, blocksize=32)
    nm = (2, 4) if pattern else (0, 0)

    def prune(W, X):
        H = 2.0 / len(X) * X.T @ X
        return sparsegpt_numpy(W, H, 0.5, *nm, blocksize=32)

    ref = reference_prune(model, calib, names, prune, "sequential")
    for (i, name), (W_ref, keep) in ref.items():
        ours_keep = kernel_of(masks.tree, i, name).astype(bool)
        assert (ours_keep == keep).mean() > 0.995, (i, name)
        W = kernel_of(new_params.tree, i, name)
        both = ours_keep == keep
        np.testing.assert_allclose(W[both], W_ref[both], atol=2e-3, rtol=0)
        assert (W[~ours_keep] == 0).all()


def test_magnitude_matches_numpy_per_matrix_and_keeps_other_leaves():
    cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    params = jp.init(cfg, jax.random.key(3))
    masks = jp.magnitude(params, sparsity=0.3)
    for (path, m), (_, w) in zip(jax.tree_util.tree_flatten_with_path(masks)[0],
                                 jax.tree_util.tree_flatten_with_path(params)[0]):
        m, w = np.asarray(m), np.asarray(w)
        assert m.shape == w.shape and m.dtype == bool
        if path[0].key == "layers" and path[-1].key == "kernel":
            keep = w.size - int(w.size * 0.3)
            order = np.argsort(-np.abs(w).ravel(), kind="stable")
            ref = np.zeros(w.size, bool)
            ref[order[:keep]] = True
            np.testing.assert_array_equal(m.ravel(), ref)
        else:
            assert m.all(), jax.tree_util.keystr(path)


def test_precomputed_statistics_equal_dense_mode():
    model = tiny_llama()
    params = ours_params(model)
    calib = calib_tokens(101)
    halves = [jax.jit(jp.input_stats, static_argnums=2)(params, c, "sumsq") for c in (calib[:3], calib[3:])]
    stats = jax.tree.map(lambda a, b: a + b, *halves)  # e.g. a psum across devices
    a = jp.wanda(params, stats, sparsity=0.5)
    b = jp.wanda(params, calib, sparsity=0.5, mode="dense")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_prunable_predicate_and_per_layer_sparsity():
    model = tiny_llama()
    params = ours_params(model)
    calib = calib_tokens(101)
    only_mlp = lambda p: jp.default_prunable(p) and p[2] == "mlp"
    masks = jp.wanda(params, calib, sparsity=0.5, prunable=only_mlp, per_layer_sparsity=[0.25, 0.75])
    s = jp.sparsity_summary(masks)["layers"]
    assert s["['layers'][0]['self_attn']['q_proj']['kernel']"]["zeros"] == 0
    assert s["['layers'][0]['mlp']['up_proj']['kernel']"]["sparsity"] == 0.25
    assert s["['layers'][1]['mlp']['down_proj']['kernel']"]["sparsity"] == 0.75


@pytest.mark.parametrize("call,match", [
    (lambda p, c: jp.wanda(p, c, sparsity=1.0), "sparsity"),
    (lambda p, c: jp.wanda(p, c, pattern="3:3"), "0 < N < M"),
    (lambda p, c: jp.wanda(p, c, pattern="2:5"), "does not divide"),
    (lambda p, c: jp.wanda(p, c[:0]), "calibration tokens"),
    (lambda p, c: jp.wanda(p, c + 1000), "must lie in"),
    (lambda p, c: jp.wanda(p, c, mode="fast"), "mode must be"),
    (lambda p, c: jp.wanda(p, c, scope="global"), "scope"),
    (lambda p, c: jp.wanda(p.tree, c), "needs apply_fn"),
    (lambda p, c: jp.wanda([p], c), "expected jaxprune Params"),
    (lambda p, c: jp.sparsegpt(p, c, pattern="2:4", blocksize=30), "multiple of M"),
    (lambda p, c: jp.wanda(p, {"sums": {}, "count": 1}), "statistics are missing"),
    (lambda p, c: jp.wanda(p, c, prunable=lambda path: False), "selects no"),
    (lambda p, c: jp.wanda(p, c, prunable=lambda path: path[-1] == "kernel" or path[-1] == "embedding"),
     "use jaxprune.magnitude|prune those"),
    (lambda p, c: jp.wanda(p, c, per_layer_sparsity=[0.5]), "per-layer"),
])
def test_bad_inputs_are_rejected_with_a_message(call, match):
    model = tiny_llama()
    params = ours_params(model)
    with pytest.raises(jp.JaxpruneError, match=match):
        call(params, calib_tokens(101))


def test_nan_weights_are_rejected():
    params = ours_params(tiny_llama())
    tree = jax.tree.map(lambda x: x, params.tree)
    tree["layers"][0]["mlp"]["up_proj"]["kernel"] = tree["layers"][0]["mlp"]["up_proj"]["kernel"].at[0, 0].set(np.nan)
    with pytest.raises(jp.InvalidArgumentError, match=r"up_proj.*NaN or Inf"):
        jp.magnitude(params.replace(tree), 0.5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_wanda_column_blocks_match_a_numpy_row_selection(dtype, pattern):
    """Large kernels are selected in blocks of output columns (over the kernel's bits); the masks
    and pruned weights equal a plain numpy per-output selection."""
    import jax.numpy as jnp
    from jaxprune.oneshot.pruning import WandaRule, _column_block
    rng = np.random.default_rng(0)
    n_in, n_out = 2048, 1536
    kernel = jnp.asarray(rng.normal(size=(n_in, n_out)), dtype)
    sumsq = jnp.asarray(rng.uniform(0.5, 2.0, n_in) * 10, jnp.float32)
    assert _column_block(n_out, max(64, (1 << 20) // n_in)) < n_out      # the blocked path runs
    rule = WandaRule(pattern, "row")
    new, keep = jax.jit(lambda d, n: rule(("mlp", "up_proj"), d, sumsq, 10.0, n))(
        {"kernel": kernel}, rule.counts(kernel.shape, 0.5))
    scores = np.abs(np.asarray(kernel, np.float32)) * np.sqrt(np.asarray(sumsq) / 10.0)[:, None]
    if pattern is None:
        ref = np.zeros(scores.shape, bool)
        top = np.argsort(-scores, axis=0, kind="stable")[: n_in // 2]
        np.put_along_axis(ref, top, True, axis=0)
    else:
        g = scores.reshape(n_in // 4, 4, n_out)
        order = np.argsort(-g, axis=1, kind="stable")[:, :2]
        ref = np.zeros(g.shape, bool)
        np.put_along_axis(ref, order, True, axis=1)
        ref = ref.reshape(n_in, n_out)
    np.testing.assert_array_equal(np.asarray(keep), ref)
    np.testing.assert_array_equal(np.asarray(new["kernel"]), np.where(ref, np.asarray(kernel), 0))
    assert new["kernel"].dtype == kernel.dtype


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 24), d=st.integers(1, 700), seed=st.integers(0, 2**16))
def test_gram_equals_the_full_product_and_is_symmetric(n, d, seed):
    """`gram` computes only the blocks on and above the diagonal (up to 8 of them)."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    g = np.asarray(gram(jnp.asarray(x)))
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4 * np.sqrt(n))
    np.testing.assert_array_equal(g, g.T)


@pytest.mark.parametrize("d", [5, 200, 577])
def test_inverse_upper_factor_is_the_cholesky_factor_of_the_inverse(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((2 * d, d)) * rng.uniform(0.05, 5.0, d)
    H = x.T @ x / (2 * d) + 0.01 * np.eye(d)
    U = np.asarray(inverse_upper_factor(jnp.asarray(H, jnp.float32)), np.float64)
    ref = np.linalg.cholesky(np.linalg.inv(H)).T
    np.testing.assert_allclose(U, ref, atol=1e-4 * np.abs(ref).max())
    assert np.array_equal(U, np.triu(U))


@pytest.mark.parametrize("nm", [(0, 0), (2, 4), (4, 8)])
def test_sparsegpt_solver_on_a_wide_kernel_matches_reference(nm):
    """400 inputs: three full blocks of 128 and a partial one, sub-blocks inside each, a Hessian from
    `hessian` (blocked Gram matrix) with dead and badly scaled inputs."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((900, 400)).astype(np.float32) * rng.uniform(0.02, 4.0, 400).astype(np.float32)
    X[:, [3, 150, 399]] = 0.0
    W = rng.standard_normal((48, 400)).astype(np.float32)   # reference layout [out, in]
    H = np.asarray(sparsegpt_hessian(jnp.asarray(X)))
    np.testing.assert_allclose(H, 2.0 / len(X) * (X.astype(np.float64).T @ X), rtol=1e-4, atol=1e-3)
    new, keep = prune_kernel(jnp.asarray(W.T), jnp.asarray(H), 0.5, nm=nm if nm[0] else None)
    W_ref, keep_ref = sparsegpt_numpy(W, H, 0.5, *nm)
    keep = np.asarray(keep).T
    assert (keep == keep_ref).mean() > 0.995
    both = keep == keep_ref
    np.testing.assert_allclose(np.asarray(new).T[both], W_ref[both], atol=2e-3 * np.abs(W_ref).max(), rtol=0)
    assert (np.asarray(new).T[~keep] == 0).all()


@pytest.mark.parametrize("nm", [None, (2, 4)])
@settings(max_examples=4, deadline=None, derandomize=True, database=None)
@given(sparsity=st.sampled_from([0.3, 0.5]), seed=st.integers(0, 99))
def test_sparsegpt_group_solve_equals_solving_each_kernel_alone(nm, sparsity, seed):
    """Kernels sharing one Hessian (q/k/v, gate/up) solved together: each gets what `solve` gives it
    alone (its own mask and prune counts; the reference comparison of `solve` is above, and
    test_sparsegpt_matches_reference runs the grouped path against numpy). 40 inputs: two full
    blocks of 16 and a partial one; fixed shapes, so each program compiles once."""
    widths, d = (24, 8, 8), 40
    from jaxprune.sparsity.sparsegpt import block_counts, solve, solve_group
    rng = np.random.default_rng(seed)
    X = jnp.asarray(rng.standard_normal((3 * d, d)), jnp.float32)
    H = sparsegpt_hessian(X)
    Ws = [jnp.asarray(rng.standard_normal((d, w)), jnp.float32) for w in widths]   # kernels [in, out]
    counts = tuple(block_counts(w, d, sparsity, 16) for w in widths)
    together = solve_group(tuple(Ws), H, counts, nm=nm, blocksize=16)
    for W, c, (new, keep) in zip(Ws, counts, together):
        new_alone, keep_alone = solve(W, H, *c, nm=nm, blocksize=16)
        assert keep.shape == W.shape and new.dtype == W.dtype
        np.testing.assert_array_equal(keep, keep_alone)
        np.testing.assert_allclose(new, new_alone, atol=1e-5 * float(jnp.abs(new_alone).max()), rtol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pattern=st.sampled_from([None, (2, 4), (4, 8)]),
       scope=st.sampled_from(["row", "layer"]), levels=st.integers(1, 6), sparsity=st.sampled_from([0.3, 0.5, 0.7]))
def test_wanda_host_selection_equals_compiled(seed, pattern, scope, levels, sparsity):
    """WandaRule.prune_host (numpy, for CPU kernels) gives the compiled rule's mask and weights bit for
    bit, on kernels and statistics with many equal scores (few levels), so the tie rules agree."""
    from jaxprune.oneshot.pruning import WandaRule
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.integers(-levels, levels + 1, (16, 24)).astype(np.float32) / 4)
    stat = jnp.asarray(rng.integers(0, 3, 16).astype(np.float32))
    count = jnp.asarray(6.0, jnp.float32)
    rule = WandaRule(nm=pattern, scope=scope)
    n = rule.counts(kernel.shape, sparsity)
    host = rule.prune_host({"kernel": kernel}, stat, count, n)
    assert host is not None
    compiled = jax.jit(rule, static_argnums=0)(None, {"kernel": kernel}, stat, count, jnp.int32(n))
    np.testing.assert_array_equal(np.asarray(host[1]), np.asarray(compiled[1]))
    np.testing.assert_array_equal(np.asarray(host[0]["kernel"]), np.asarray(compiled[0]["kernel"]))
