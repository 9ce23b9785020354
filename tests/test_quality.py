"""Quality on real models: SmolLM2-135M (GGUF) and the small OPT trained on the bundled text.

SmolLM2 follows the protocol of issue #4 (benchmarks/oneshot.py runs it whole) at a quarter of
its cost, to keep the suite's time: 16 calibration windows of 512 tokens instead of 32 (the same
texts, seed and sampler) and the first 16 of its 64 evaluation windows. The reference figures are
the perplexities, on those windows, of the weights that locuslab/wanda's PyTorch procedure
(benchmarks/reference_torch.py, through benchmarks.oneshot.torch_reference) prunes from the same
weights with the same 16 calibration windows. With the issue's full protocol that procedure gives
363.17, 51.44 and 40.24 (the issue: 363.17, 51.48 and 40.38 from the reference's own evaluation).
Dense: 26.77 on 64 windows, DENSE_16 on 16.
"""

from __future__ import annotations

import os

import pytest

import jaxprune as jp

REFERENCE_50 = {"magnitude": 328.70, "wanda": 45.80, "sparsegpt": 36.04}   # 16 calibration, first 16 eval windows
DENSE_16 = 24.22
CALIBRATION_WINDOWS = 16
EVAL_WINDOWS = 16
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_opt")


def reference_calibration(tok):
    return jp.calibration_windows(tok, [jp.bundled_text(n) for n in jp.data.CALIBRATION_TEXTS],
                                  n=CALIBRATION_WINDOWS, seqlen=512, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(REFERENCE_50))
def test_smollm2_one_shot_quality_matches_the_reference(smollm2, method):
    """Each method within 2% of the reference implementation's perplexity. Wanda and magnitude are
    deterministic given the calibration, so they must also not be much *better* than the reference
    (a sign of a different protocol); with the bands, SparseGPT < Wanda < magnitude follows."""
    params, tok = smollm2
    ev = jp.eval_windows(tok, jp.bundled_text(jp.data.EVALUATION_TEXT), seqlen=512, max_windows=EVAL_WINDOWS)
    if method == "magnitude":
        pruned = jp.apply_masks(params, jp.magnitude(params, 0.5))
    elif method == "wanda":
        pruned = jp.apply_masks(params, jp.wanda(params, reference_calibration(tok), 0.5))
    else:
        pruned = jp.sparsegpt(params, reference_calibration(tok), 0.5)[0]
    ppl = jp.perplexity(pruned, ev, seqlen=512)
    ref = REFERENCE_50[method]
    assert ppl <= ref * 1.02, (method, ppl, ref)
    if method != "sparsegpt":
        assert ppl >= ref * 0.98, (method, ppl, ref)
    assert ppl > DENSE_16, ppl                       # no pruned model beats the dense one


def test_trained_opt_fixture_orders_methods():
    """The small trained OPT: at 2:4, SparseGPT < Wanda < magnitude; at 50%, Wanda < magnitude."""
    params, tok = jp.load(FIXTURE), jp.tokenizer(FIXTURE)
    calib = jp.calibration_windows(tok, [jp.bundled_text("emma"), jp.bundled_text("mansfieldpark")],
                                   n=32, seqlen=256, seed=0)
    ev = jp.eval_windows(tok, jp.bundled_text("prideprejudice"), seqlen=256, max_windows=32)
    dense = jp.perplexity(params, ev)
    ppl = {}
    for pattern in (None, "2:4"):
        ppl["magnitude", pattern] = jp.perplexity(jp.apply_masks(params, jp.magnitude(params, 0.5, pattern=pattern)), ev)
        ppl["wanda", pattern] = jp.perplexity(jp.apply_masks(params, jp.wanda(params, calib, 0.5, pattern=pattern)), ev)
        ppl["sparsegpt", pattern] = jp.perplexity(jp.sparsegpt(params, calib, 0.5, pattern=pattern)[0], ev)
    assert ppl["sparsegpt", "2:4"] < ppl["wanda", "2:4"] < ppl["magnitude", "2:4"], ppl
    assert dense < ppl["wanda", None] < ppl["magnitude", None], (dense, ppl)
