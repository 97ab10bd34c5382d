#!/usr/bin/env bash
# Reproduce a leaderboard row: bash eval.sh records/<track>/<record folder>
# Verifies the record's checksums, regenerates its samples from its checkpoint with its protocol,
# rescores them, prints recorded vs reproduced, and exits non-zero outside the track's tolerance.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
exec "$PY" -m records.reproduce "$@"
