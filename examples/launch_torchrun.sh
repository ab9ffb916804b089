#!/usr/bin/env bash
# Multi-node launch with torchrun (env:// rendezvous through c10d). Run this same script on every node.
# It runs torchrun through megatron_zero.launcher (same flags), which forwards SIGUSR1/SIGTERM to every rank:
# they save a checkpoint and the script exits 75 ("stopped early, resumable": run it again with the same --load).
# Exit status: 0 finished, 75 preempted after saving, 2 bad input, 1 other failure.
#
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0 host> ./examples/launch_torchrun.sh \
#       -m megatron_zero.training.pretrain_vlm --stage 3 ...
#
# Single node: ./examples/launch_torchrun.sh -m megatron_zero.training.pretrain_lm --model tiny --mock-data ...
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

source "$(dirname "$0")/env_nccl.sh"

exec "${PYTHON:-python}" -m megatron_zero.launcher \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megatron_zero}" \
  "$@"
