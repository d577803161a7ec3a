#!/usr/bin/env bash
# Set up (idempotent), then run a suite on the CPU and write results/ and reports/.
# Usage: scripts/run.sh [SUITE] [equibench run options...]   (default suite: quick)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
SUITE=${1:-quick}; shift || true
exec .venv/bin/equibench run "$SUITE" --device cpu "$@"
