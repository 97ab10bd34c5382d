#!/usr/bin/env bash
# Reproduce a leaderboard row: bash eval.sh records/<track>/<record folder>
# Validates the record (python -m records.validate's checks), regenerates every evaluation seed's
# samples from its checkpoint with the track's protocol, rescores them, prints recorded vs
# reproduced, and exits 1 outside the track's tolerance, 2 for an invalid record, 3 when it
# could not run (no verdict).
#   bash eval.sh <record> --retrain   cheap tracks: re-train from the record's config first
#   bash eval.sh <record> --out DIR   keep the regenerated samples (never inside records/)
#   NPROC=8 bash eval.sh <record>     sampling processes (default: one per visible GPU, else 1)
set -euo pipefail
# every argument that is not a flag is a path (the record, --out's, --root's): relative to where
# the command was typed, while the reproduction runs from the repository root (the tracks' data)
ARGS=()
for arg in "$@"; do
  [[ "$arg" == -* || "$arg" == /* ]] || arg="$PWD/$arg"
  ARGS+=("$arg")
done
cd "$(dirname "$0")"
source scripts/env.sh
source scripts/gpus.sh
GPUS=$(visible_gpus)
exec "$PY" -m records.reproduce --processes "${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}" "${ARGS[@]}"
