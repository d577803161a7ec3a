#!/usr/bin/env bash
# Set up (idempotent), then run a suite on the CPU and write results/ and reports/.
# Usage: scripts/run.sh [SUITE] [equibench run options...]   (default suite: quick)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# one OpenMP thread per process: with two, any other load on a 2-core machine stalls small models
# 20-100x (docs/design.md, "Threads"); every throughput row records the thread count it ran with
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# one worker per core (EQUIBENCH_JOBS to change it): training runs side by side, and every timing
# runs alone with the other workers paused (`--jobs`, equibench/core/quiet.py); not `nproc`, which
# reads OMP_NUM_THREADS
JOBS=${EQUIBENCH_JOBS:-$(getconf _NPROCESSORS_ONLN)}
SUITE=${1:-quick}; shift || true
exec .venv/bin/equibench run "$SUITE" --device cpu --jobs "$JOBS" "$@"
