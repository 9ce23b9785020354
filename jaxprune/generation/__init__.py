"""Generation: one KV-cached decoding engine (greedy and sampled), its cache and its sampler."""

from jaxprune.generation.engine import (
    decode,
    decode_core,
    decode_submodels,
    generate,
    num_submodels,
    pad_prompts,
    stop_array,
    trim,
)
from jaxprune.generation.kv_cache import cache_bytes, init_cache
from jaxprune.generation.sampling import Sampler, filter_logits, sample
