"""Shared fixtures: tiny random HF models (via transformers) and the real SmolLM2."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

SHARED_AUSTEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "austen")


def hf_to_named(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def tiny_llama(**overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(overrides.pop("seed", 0))
    kw = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    kw.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def tiny_opt(**overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(overrides.pop("seed", 0))
    kw = dict(vocab_size=99, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)
    kw.update(overrides)
    return transformers.OPTForCausalLM(transformers.OPTConfig(**kw)).eval()


def torch_logits(model, tokens) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def smollm2():
    import jaxprune as jp
    try:
        return jp.load("smollm2-135m"), jp.tokenizer("smollm2-135m")
    except jp.CheckpointError as e:
        pytest.skip(f"SmolLM2 weights not installed: {e}")


# tests/multidevice needs several devices; tests/test_distributed.py runs it in a subprocess with
# XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before jax starts).
# tests/workers holds scripts that tests run as subprocesses.
collect_ignore = ["workers"] + ([] if "device_count" in os.environ.get("XLA_FLAGS", "") else ["multidevice"])


def pytest_configure(config):
    """One JAX persistent compilation cache for the whole run, shared by both xdist workers and every
    subprocess a test starts (they inherit the environment): most of the suite's time is compiling
    the same tiny-model programs, and a program compiled once is then read from disk. The cache starts
    empty in each run (a fresh temporary directory, removed at the end), so nothing carries over
    between runs; a JAX_COMPILATION_CACHE_DIR set by the caller is used instead. A size limit turns on
    JAX's file lock, so the two workers never read an entry while the other writes it. JAX records
    its backend-compile event for cache reads too, so tests/test_compile_once.py still sees them."""
    if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    config._jax_cache_dir = tempfile.mkdtemp(prefix="jaxprune-tests-jax-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=config._jax_cache_dir,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_COMPILATION_CACHE_MAX_SIZE=str(16 << 30))


def pytest_unconfigure(config):
    if getattr(config, "_jax_cache_dir", None):
        shutil.rmtree(config._jax_cache_dir, ignore_errors=True)
