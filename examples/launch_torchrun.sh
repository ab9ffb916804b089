#!/usr/bin/env bash
# Multi-node launch with torchrun (c10d rendezvous). Run this same script on every node.
# It runs torchrun through megatron_zero.launcher (same flags), which forwards SIGUSR1/SIGTERM to every rank:
# they save a checkpoint and the script exits 75 ("stopped early, resumable": run it again with the same --load).
# Exit status: 0 finished, 75 preempted after saving, 2 bad input, 1 other failure. Under SLURM use
# examples/slurm/*.sbatch instead (they requeue themselves on 75); docs/slurm.md has the details.
#
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0 host> ./examples/launch_torchrun.sh \
#       -m megatron_zero.training.pretrain_vlm --stage 3 ...
#
# Single node: ./examples/launch_torchrun.sh -m megatron_zero.training.pretrain_lm --model tiny --mock-data ...
# Python: $PYTHON, else the checkout's .venv when present, else python3. Processes per node: $GPUS_PER_NODE, else
# the GPU count; without a GPU, tensor x pipeline parallel size from the arguments (the smallest world that fits).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if [ "$GPUS_PER_NODE" -eq 0 ]; then
    tp=1 pp=1 prev=
    for a in "$@"; do
      case "$prev" in --tensor-model-parallel-size) tp=$a ;; --pipeline-model-parallel-size) pp=$a ;; esac
      case "$a" in --tensor-model-parallel-size=*) tp=${a#*=} ;; --pipeline-model-parallel-size=*) pp=${a#*=} ;; esac
      prev=$a
    done
    GPUS_PER_NODE=$((tp * pp))
    echo "launch_torchrun.sh: no GPU: $GPUS_PER_NODE CPU process(es) per node (TP x PP); set GPUS_PER_NODE for more" >&2
  fi
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

source "$REPO/examples/env_nccl.sh"

exec "$PYTHON" -m megatron_zero.launcher \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megatron_zero}" \
  "$@"
