#!/usr/bin/env bash
# Set up (idempotent), then run the test suite. `scripts/test.sh --slow` also runs slow tests.
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
for a in "$@"; do
  if [ "$a" = "--slow" ]; then ARGS+=(-m "slow or not slow"); else ARGS+=("$a"); fi
done
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${ARGS[@]}"
