#!/usr/bin/env bash
# Set up (idempotent), then run the test suite. `scripts/test.sh --slow` also runs slow tests;
# `scripts/test.sh --slurm` also runs the Slurm tests (tests/test_slurm.py, marker `slurm`) against the
# single-node cluster of scripts/slurm-local.sh, started first (Debian's slurm-wlm; needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# the browser test of the HTML report needs Debian's chromium + chromium-driver
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  echo "[test] installing chromium + chromium-driver (apt-get)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# small models: one thread per process is faster and immune to oversubscription (throughput
# figures in tests are never asserted as timings)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS=()
SLOW=0
SLURM=0
for a in "$@"; do
  case "$a" in
    --slow) SLOW=1 ;;
    --slurm) SLURM=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
# without either flag pyproject's addopts deselects both (-m 'not slow and not slurm')
if [ "$SLOW" = 1 ] && [ "$SLURM" = 1 ]; then ARGS=(-m "slow or not slow" "${ARGS[@]}")
elif [ "$SLOW" = 1 ]; then ARGS=(-m "not slurm" "${ARGS[@]}")
elif [ "$SLURM" = 1 ]; then ARGS=(-m "not slow" "${ARGS[@]}")
fi
if [ "$SLURM" = 1 ]; then
  scripts/slurm-local.sh
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${ARGS[@]}"
