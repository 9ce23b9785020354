"""Size on disk of pruned SmolLM2-135M: dense safetensors vs jaxprune's compressed storage.

For each sparsity pattern (magnitude masks: the format depends only on the pattern),
writes the dense HF directory (`jp.save`), the compressed one (`jp.save_compressed`),
and, as a peer, gzip (level 6) of the dense model.safetensors, and times writing and
reading back. Checks the compressed round trip is exact.

    python -m benchmarks.storage            # writes a section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import time

import jax
import numpy as np

import jaxprune as jp

from .common import machine, write_section

PATTERNS = [("50% unstructured", None), ("2:4", "2:4"), ("4:8", "4:8")]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def main() -> None:
    params = jp.load("smollm2-135m")
    work = tempfile.mkdtemp(prefix="jaxprune-storage-")
    rows = []
    try:
        for label, pattern in PATTERNS:
            masks = jp.magnitude(params, 0.5, pattern=pattern)
            pruned = jp.apply_masks(params, masks)
            jax.block_until_ready(pruned)
            dense_dir = jp.save(pruned, os.path.join(work, "dense"), overwrite=True)
            dense = dir_bytes(dense_dir)
            t = time.perf_counter()
            with open(os.path.join(dense_dir, "model.safetensors"), "rb") as f:
                gz = len(gzip.compress(f.read(), 6))
            t_gz = time.perf_counter() - t
            t = time.perf_counter()
            info = jp.save_compressed(pruned, os.path.join(work, "packed"), masks=masks, overwrite=True)
            t_save = time.perf_counter() - t
            t = time.perf_counter()
            back, back_masks = jp.load_compressed(info["path"])
            t_load = time.perf_counter() - t
            exact = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                        zip(jax.tree.leaves(back), jax.tree.leaves(pruned)))
            exact &= all(np.array_equal(np.asarray(a), np.asarray(b, bool)) for a, b in
                         zip(jax.tree.leaves(back_masks), jax.tree.leaves(masks)))
            layer_dense = sum(int(np.size(x)) * 4 for x in jax.tree.leaves(params["layers"]))
            rows.append((label, dense, gz, info["bytes_on_disk"], t_gz, t_save, t_load, exact, layer_dense))
            print(rows[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = 2**20
    lines = [f"Machine: {machine()}. SmolLM2-135M float32 (tied embeddings, 28.3 M embedding parameters stay "
             f"dense), magnitude masks at 50% of every decoder-layer linear weight.", "",
             "| pattern | dense safetensors | gzip -6 of dense (peer) | jaxprune compressed | compressed / dense | "
             "gzip time | save / load time | exact round trip |", "|---|---|---|---|---|---|---|---|"]
    for label, dense, gz, packed, t_gz, t_save, t_load, exact, _ in rows:
        lines.append(f"| {label} | {dense / mib:.1f} MiB | {gz / mib:.1f} MiB ({gz / dense:.2f} x) | "
                     f"{packed / mib:.1f} MiB | {packed / dense:.3f} x | {t_gz:.1f} s | {t_save:.1f} s / {t_load:.1f} s "
                     f"| {'yes' if exact else 'NO'} |")
    layer = rows[0][-1]
    lines += ["", f"Decoder-layer weights alone are {layer / mib:.1f} MiB dense; at 50% a packed float32 weight "
              "costs 16 bits of value + 1 bit of mask (unstructured) or + 1 bit of index (2 bits per kept value, "
              "2:4), about 0.53 x, and 4:8 (3 index bits per kept value) 0.55 x."]
    write_section("Compressed storage of pruned SmolLM2 (benchmarks/storage.py)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
