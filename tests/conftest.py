"""Shared fixtures: tiny random HF models (via transformers) and the real SmolLM2."""

from __future__ import annotations

import os

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

