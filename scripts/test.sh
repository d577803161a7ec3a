#!/usr/bin/env bash
# Set up (idempotent), then run the test suite. `scripts/test.sh --slow` also runs slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
ARGS=()
for a in "$@"; do
  if [ "$a" = "--slow" ]; then ARGS+=(-m "slow or not slow"); else ARGS+=("$a"); fi
done
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${ARGS[@]}"
