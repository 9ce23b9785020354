"""One method contract: jp.prune returns the same result type for every one-shot method, equal
to the per-method wrappers; structured methods share StructuredResult; keys are explicit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.structured.compact import effective_gates
from jaxprune.structured.result import StructuredResult


@pytest.fixture(scope="module")
def tiny():
    cfg = jp.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    params = jp.init(cfg, jax.random.key(0))
    calib = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 16)), jnp.int32)
    return params, calib


def _equal(a, b):
    return all(bool(jnp.all(x == y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_prune_equals_the_per_method_functions(tiny):
    params, calib = tiny
    for method in jp.ONE_SHOT_METHODS:
        r = jp.prune(params, calib, method=method, sparsity=0.5, pattern="2:4")
        assert isinstance(r, jp.PruneResult) and r.method == method and r.settings == {"sparsity": 0.5, "pattern": "2:4"}
        if method == "sparsegpt":
            new, masks = jp.sparsegpt(params, calib, sparsity=0.5, pattern="2:4")
            want_params = jp.apply_masks(new, masks)
        else:
            masks = getattr(jp, method)(params, *([] if method == "magnitude" else [calib]), sparsity=0.5,
                                        pattern="2:4")
            want_params = jp.apply_masks(params, masks)
        assert _equal(r.masks, masks) and _equal(r.params, want_params)
        # the pruned params really are pruned: masked entries are exactly zero
        for p, m in zip(jax.tree.leaves(r.params), jax.tree.leaves(r.masks)):
            assert bool(jnp.all(jnp.where(m, True, p == 0)))


def test_prune_rejects_unknown_methods_and_missing_data(tiny):
    params, calib = tiny
    with pytest.raises(jp.InvalidArgumentError, match="unknown one-shot method"):
        jp.prune(params, calib, method="bonsai")
    with pytest.raises(jp.InvalidArgumentError, match="needs calibration data"):
        jp.prune(params, method="wanda")
    with pytest.raises(jp.InvalidArgumentError, match="sparsity"):
        jp.prune(params, calib, method="wanda", sparsity=1.5)


def test_structured_methods_share_one_result_type(tiny):
    params, calib = tiny
    results = [jp.bonsai(params, calib, target=0.2, n_samples=4, key=jax.random.key(0), show_progress=False),
               jp.finercut(params, calib, n_remove=1, show_progress=False),
               jp.l0_prune(params, calib, target=0.3, steps=3, batch_size=2, key=jax.random.key(0),
                           show_progress=False)]
    x = calib[:2]
    for r in results:
        assert isinstance(r, StructuredResult)
        assert 0.0 < r.removed_fraction < 1.0 and isinstance(r.history, list) and r.history
        small = r.compact()
        np.testing.assert_allclose(np.asarray(jp.forward(small, x)),
                                   np.asarray(jp.forward(r.params, x, effective_gates(r.params, r.gates))), atol=1e-4)


def test_callbacks_receive_the_history_records(tiny):
    params, calib = tiny
    for run in (lambda cb: jp.bonsai(params, calib, target=0.2, n_samples=0, show_progress=False, callback=cb),
                lambda cb: jp.finercut(params, calib, n_remove=2, show_progress=False, callback=cb),
                lambda cb: jp.l0_prune(params, calib, target=0.3, steps=3, log_every=1, batch_size=2,
                                       key=jax.random.key(0), show_progress=False, callback=cb)):
        seen = []
        res = run(seen.append)
        assert seen == res.history and seen


def test_randomness_needs_an_explicit_key(tiny):
    params, calib = tiny
    with pytest.raises(jp.InvalidArgumentError, match="key"):
        jp.bonsai(params, calib, target=0.2, n_samples=4, show_progress=False)
    with pytest.raises(jp.InvalidArgumentError, match="key"):
        jp.l0_prune(params, calib, target=0.3, steps=2, show_progress=False)
    with pytest.raises(jp.InvalidArgumentError, match="key"):
        jp.lora_finetune(params, calib, steps=1, show_progress=False)
