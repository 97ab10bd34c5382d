#!/usr/bin/env bash
# Train at a track's fixed budget, then sample, score, write the record and re-render LEADERBOARD.md.
#   bash train.sh                         the digits track, one CPU process (the embedded default)
#   bash train.sh --track T --model SiT-B/1 ...   any train.py flag (python train.py --help)
#   NPROC=8 bash train.sh ...             processes (default: one per visible GPU, else 1)
# Multi-node: call `accelerate launch <your cluster flags> train.py ...` directly.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}"
if (( NPROC == 1 )); then
  exec "$PY" train.py "$@"
fi
if (( GPUS == 0 )); then
  export ACCELERATE_USE_CPU=1  # real gloo processes on CPU (accelerate's --cpu would start only one)
fi
exec "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$NPROC" --num_machines 1 \
  --mixed_precision no --dynamo_backend no train.py "$@"
