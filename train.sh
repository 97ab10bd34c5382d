#!/usr/bin/env bash
# Train at a track's fixed budget, then sample, score, write the record and re-render LEADERBOARD.md.
#   bash train.sh                         the digits track, one CPU process (the embedded default)
#   bash train.sh --track T --model SiT-B/1 ...   any train.py flag (python train.py --help)
#   NPROC=8 bash train.sh ...             processes (default: one per visible GPU, else 1)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 [MASTER_PORT=29500] NPROC=8 bash train.sh ...
#                                         multi-node: the same command on every node, each with its
#                                         NODE_RANK; NPROC is per node. runs/ and the data must be
#                                         on a filesystem every node sees (rank 0 writes checkpoints).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
source scripts/gpus.sh
GPUS=$(visible_gpus)
NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}"
NNODES="${NNODES:-1}"
if (( NPROC == 1 && NNODES == 1 )); then
  exec "$PY" train.py "$@"
fi
NODES=(--num_machines "$NNODES")
if (( NNODES > 1 )); then
  if [[ -z "${NODE_RANK:-}" || -z "${MASTER_ADDR:-}" ]]; then
    echo "train.sh: NNODES=$NNODES needs NODE_RANK (0..$((NNODES - 1)), this node's) and MASTER_ADDR (node 0's address)" >&2
    exit 2
  fi
  NODES+=(--machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}")
fi
if (( GPUS == 0 )); then
  export ACCELERATE_USE_CPU=1  # real gloo processes on CPU (accelerate's --cpu would start only one)
fi
# after a SIGTERM the ranks finish their step and rank 0 writes a checkpoint (2.2 GB for SiT-B/1
# with its EMA and Adam moments, often to a network filesystem); torchrun's agent SIGKILLs workers
# 30 s after forwarding the signal unless told otherwise
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
# --num_processes counts the processes of all nodes
exec "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$((NPROC * NNODES))" "${NODES[@]}" \
  --mixed_precision no --dynamo_backend no train.py "$@"
