"""The main job on the bundled defaults: SmolLM2-135M and public-domain text, offline.

    python examples/demo.py            (what `make demo` runs)
"""

import time

import jaxprune as jp

SEQLEN = 512
WINDOWS = 64

t0 = time.perf_counter()
params = jp.load("smollm2-135m")
tok = jp.tokenizer("smollm2-135m")
print(f"loaded SmolLM2-135M-Instruct: {params} in {time.perf_counter() - t0:.1f}s")

ev = jp.eval_windows(tok, jp.bundled_text(jp.data.EVALUATION_TEXT), seqlen=SEQLEN, max_windows=WINDOWS)
t0 = time.perf_counter()
ppl = jp.perplexity(params, ev, seqlen=SEQLEN)
print(f"dense perplexity on {WINDOWS} x {SEQLEN} tokens of '{jp.data.EVALUATION_TEXT}': {ppl:.2f} "
      f"({time.perf_counter() - t0:.1f}s)")
