"""Shared helpers for benchmarks: machine description and RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import jax
    dev = jax.devices()[0]
    acc = dev.device_kind if dev.platform != "cpu" else "no accelerator"
    return f"{cpu}, {os.cpu_count()} cores, {acc} (jax {jax.__version__}, backend {dev.platform})"


def best_of(fn, repeats: int = 3) -> float:
    """Minimum wall time of `fn()` over `repeats` runs (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `## name` of benchmarks/RESULTS.md."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n\nWritten by `python -m benchmarks.NAME`; each section names its machine.\n"
    header = f"## {name}\n"
    section = header + body.rstrip() + "\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with open(RESULTS, "w") as f:
        f.write(text.rstrip() + "\n")
