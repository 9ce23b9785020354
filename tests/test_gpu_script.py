"""benchmarks/gpu.py's CPU mode on tiny shapes: every row present, every figure a positive finite
number (no timing thresholds: only that the script measures what it claims to)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["peak probe", "forward smollm2", "forward 7b-stack", "wanda 7b-layer", "sparsegpt 7b-layer", "bonsai vmap",
        "bonsai loop", "decode smollm2 b1", "decode smollm2 b16", "decode 7b-stack b1", "decode 7b-stack b16"]
POSITIVE = ("value", "seconds", "floor_s", "vs_floor")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_run_writes_every_row(tmp_path):
    out = tmp_path / "tmp.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip())
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["platform"] == "cpu" and data["tiny"] is True
    assert all(positive(data["peaks"][k]) for k in ("bf16", "fp32", "hbm")) and "estimated" in data["peaks"]["source"]
    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        assert "error" not in row and "skipped" not in row, (name, row)
        bad = {k: row.get(k) for k in POSITIVE if not positive(row.get(k))}
        assert not bad, (name, bad)
        assert math.isfinite(row["compile_s"]) and row["compile_s"] >= 0, (name, row)   # shared programs: ~0
        assert row["bound"] in ("FLOP", "memory") and row["unit"]
        assert math.isclose(row["vs_floor"], row["seconds"] / row["floor_s"])
    assert "| decode 7b-stack b16 |" in r.stdout                    # the markdown table went to stdout
