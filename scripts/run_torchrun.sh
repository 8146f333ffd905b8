#!/usr/bin/env bash
# Launch N DiT ranks + 1 VAE rank on this machine (CPU/gloo or one GPU per rank/NCCL).
#   NUM_GPUS_DIT=4 SAMPLE_STEPS=8 scripts/run_torchrun.sh --output outputs/demo.mp4 [more infer_multigpu.py flags]
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR/MASTER_PORT; NPROC_PER_NODE is then the per-node share.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS_DIT="${NUM_GPUS_DIT:-4}"
SAMPLE_STEPS="${SAMPLE_STEPS:-8}"
NNODES="${NNODES:-1}"
WORLD=$((NUM_GPUS_DIT + 1))
NPROC_PER_NODE="${NPROC_PER_NODE:-$WORLD}"
PYTHON="${PYTHON:-python}"
if [[ -x .venv/bin/python && "$PYTHON" == python ]]; then PYTHON=.venv/bin/python; fi

if [[ "$NNODES" == 1 ]]; then
  launch=(--standalone --nproc_per_node="$NPROC_PER_NODE")
else
  launch=(--nnodes="$NNODES" --node-rank="${NODE_RANK:?set NODE_RANK}" --nproc_per_node="$NPROC_PER_NODE"
          --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
fi

# One thread per rank unless told otherwise: ranks share the machine's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# After a failure or Ctrl-C torchrun waits this long for ranks to exit before SIGKILL: enough for the VAE rank
# to finalise the mp4, short enough that a frozen (stopped) rank does not hold the job for torchrun's default 30 s.
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-10}"
exec "$PYTHON" -m torch.distributed.run "${launch[@]}" --shutdown-timeout="$SHUTDOWN_TIMEOUT" infer_multigpu.py \
  --num_gpus_dit "$NUM_GPUS_DIT" --sample_steps "$SAMPLE_STEPS" "$@"
