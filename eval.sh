#!/usr/bin/env bash
# Reproduce a leaderboard row: bash eval.sh records/<track>/<record folder>
# Validates the record (python -m records.validate's checks), regenerates every evaluation seed's
# samples from its checkpoint with the track's protocol, rescores them, prints recorded vs
# reproduced, and exits 1 outside the track's tolerance, 2 for an invalid record.
#   bash eval.sh <record> --retrain   cheap tracks: re-train from the record's config first
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
exec "$PY" -m records.reproduce "$@"
