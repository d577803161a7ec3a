#!/usr/bin/env bash
# One short GPU check (at most 8 minutes): the GPU-marked tests, then one table comparing the
# suite's CUDA-event timing with torch.utils.benchmark, eager with torch.compile, cuEquivariance
# and OpenEquivariance with e3nn (agreement and speed) when they are installed, and the float32
# equivariance error of exact models with TF32 matmuls / convolutions off and on. On a machine
# without CUDA it prints one line and exits 0.
#
# It does not run scripts/setup.sh: that installs torch's CPU build. On a GPU machine use an
# environment with a CUDA build of torch and equibench installed (`pip install -e .[cuda]` adds
# cuEquivariance and OpenEquivariance): PYTHON=/path/to/python scripts/gpu-check.sh (default:
# .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
exec timeout 480 "$PY" scripts/gpu_check.py
