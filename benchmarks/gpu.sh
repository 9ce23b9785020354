#!/usr/bin/env bash
# benchmarks/gpu.py under a hard time limit (GPU_TIMEOUT seconds, default 480); sets nothing up.
#   benchmarks/gpu.sh [--tiny] [--out PATH] [--write]     (arguments go to python -m benchmarks.gpu)
# Python: $PYTHON, else the checkout's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
exec timeout --kill-after=20 "${GPU_TIMEOUT:-480}" "$py" -m benchmarks.gpu "$@"
