"""Synthetic checkpoints: Hugging Face directories of random weights written one layer at a time,
for streaming tests and benchmarks of models larger than memory."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxprune import models


def write_random_checkpoint(path: str, config, dtype=np.float32, seed: int = 0) -> str:
    """Write a Hugging Face directory of random weights for `config`, one layer per file, holding
    at most one tensor in memory (for streaming tests and benchmarks of models larger than memory).
    Weights ~ N(0, 0.02), norm scales 1."""
    from safetensors.numpy import save_file
    from jaxprune.io.names import path_to_hf
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=False)
    shapes = models.shapes(config)
    groups = [{"layers": [{}] * i + [lp]} for i, lp in enumerate(shapes["layers"])]
    groups.append({k: v for k, v in shapes.items() if k != "layers"})
    weight_map = {}
    for g, tree in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        arrays = {}
        for kp, shape in jax.tree_util.tree_flatten_with_path(tree, is_leaf=models.is_shape)[0]:
            p = tuple(k.key if hasattr(k, "key") else k.idx for k in kp)
            hf_shape = shape[::-1] if p[-1] == "kernel" else shape
            a = np.ones(hf_shape, dtype) if p[-1] == "scale" else \
                (0.02 * rng.standard_normal(hf_shape, np.float32)).astype(dtype)
            arrays[path_to_hf(p, config.arch)] = a
        save_file(arrays, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in arrays})
        del arrays
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config.to_hf(), "torch_dtype": dtype.name}, f,
                  indent=2, sort_keys=True)
    return path


def layer_bytes(config, dtype) -> int:
    """Bytes of one decoder layer's weights in `dtype` (layer 0's shapes)."""
    return sum(int(np.prod(s)) for s in jax.tree.leaves(models.shapes(config)["layers"][0], is_leaf=models.is_shape)) \
        * np.dtype(dtype).itemsize
