#!/usr/bin/env bash
# The whole test suite (slow end-to-end tests included): bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
exec "$PY" -m pytest "$@"
