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
  # SLURM sends SIGUSR1 (see --signal in the sbatch header) before the time limit; srun forwards it to
  # torchrun, which forwards it to the ranks: the training loop saves a checkpoint and exits cleanly.
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "torchrun \
    --nnodes $SLURM_NNODES --node-rank \$SLURM_NODEID --nproc-per-node $GPUS_PER_NODE \
    --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $SLURM_JOB_ID \
    $*"
}
