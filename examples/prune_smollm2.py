"""Prune SmolLM2-135M with each one-shot method through the Python API (offline).

    python examples/prune_smollm2.py
"""

import jaxprune as jp

params = jp.load("smollm2-135m")
tok = jp.tokenizer("smollm2-135m")
calib = jp.calibration_windows(tok, [jp.bundled_text("emma"), jp.bundled_text("mansfieldpark")],
                               n=32, seqlen=512, seed=0)
ev = jp.eval_windows(tok, jp.bundled_text("prideprejudice"), seqlen=512, max_windows=64)

print(f"dense: {jp.perplexity(params, ev, seqlen=512):.2f}")
masks = jp.magnitude(params, sparsity=0.5)
print(f"magnitude 50%: {jp.perplexity(jp.apply_masks(params, masks), ev, seqlen=512):.2f}")
masks = jp.wanda(params, calib, sparsity=0.5)
print(f"wanda 50%: {jp.perplexity(jp.apply_masks(params, masks), ev, seqlen=512):.2f}")
masks = jp.wanda(params, calib, sparsity=0.5, pattern="2:4")
print(f"wanda 2:4: {jp.perplexity(jp.apply_masks(params, masks), ev, seqlen=512):.2f}")
new_params, masks = jp.sparsegpt(params, calib, sparsity=0.5)
print(f"sparsegpt 50%: {jp.perplexity(new_params, ev, seqlen=512):.2f}")
print(jp.sparsity_summary(masks)["pruned_sparsity"])
