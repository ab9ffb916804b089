# Shared by the sbatch scripts: rendezvous from SLURM's environment, one torchrun per node.
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
source "$REPO/examples/env_nccl.sh"
CKPT_ROOT=${CKPT_ROOT:-$REPO/checkpoints}
DATA_ROOT=${DATA_ROOT:-$REPO/data}

run_torchrun() {
  # SLURM sends SIGUSR1 (see --signal in the sbatch header) before the time limit, and SIGTERM on preemption or
  # at the limit, to every process of the step. megatron_zero.launcher (torchrun with the same flags) forwards
  # both to the ranks and waits for them (plain torchrun ignores SIGUSR1 and kills the ranks 30 s after a
  # SIGTERM): every rank finishes its step, the checkpoint is saved, and the job exits 75 = "stopped early,
  # resumable" (0 = finished, 2 = bad input, 1 = other failure). Requeue on 75, e.g. with `#SBATCH --requeue`
  # and `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID` after run_torchrun; the next run resumes from --load.
  # srun --kill-on-bad-exit reports the killed peers of the first node to exit, so the per-node launcher
  # statuses are collected in a file and 75 is taken from there.
  local status="$CKPT_ROOT/.exit-status-${SLURM_JOB_ID:-0}"
  mkdir -p "$CKPT_ROOT" && rm -f "$status"
  local rc=0
  MEGATRON_ZERO_EXIT_STATUS_FILE="$status" srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "exec python -m megatron_zero.launcher \
    --nnodes $SLURM_NNODES --node-rank \$SLURM_NODEID --nproc-per-node $GPUS_PER_NODE \
    --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $SLURM_JOB_ID \
    $*" || rc=$?
  if [ "$rc" -ne 0 ] && grep -qx 75 "$status" 2>/dev/null && ! grep -qvx 75 "$status"; then rc=75; fi
  rm -f "$status"
  return "$rc"
}
