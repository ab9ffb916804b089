# Shared by the sbatch scripts (sourced; they stay thin): finds the checkout, sets up the rendezvous from SLURM's
# environment, runs one megatron_zero.launcher per node and requeues the job after a preemption.
#
# SLURM runs a *copy* of the batch script from its spool directory, so the checkout is found through REPO (set it
# when submitting from elsewhere: `REPO=/path/to/megatron_zero sbatch ...`) or the directory sbatch was run in.
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$REPO/megatron_zero/launcher.py" ]; then
  echo "error: $REPO is not a megatron_zero checkout: submit from the repository root or set REPO=<checkout>" >&2
  exit 2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-29500}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
source "$REPO/examples/env_nccl.sh"
CKPT_ROOT=${CKPT_ROOT:-$REPO/checkpoints}
DATA_ROOT=${DATA_ROOT:-$REPO/data}

run_torchrun() {
  # Runs the training (`run_torchrun <script or -m module> <args>`) and ends the job with its exit status:
  #   0 finished; 75 stopped early by SIGUSR1/SIGTERM after saving a checkpoint -> the job requeues itself
  #   (`#SBATCH --requeue`) and the next run resumes from --load; 2 bad input and 1 other failures are never
  #   requeued.
  # SLURM sends SIGUSR1 (--signal=USR1@<s> in the header) before the time limit, and SIGTERM on preemption or at
  # the limit, to every process of the step. megatron_zero.launcher (torchrun with the same flags) forwards both
  # to the ranks and waits for them: every rank finishes its step and the ranks save together. srun
  # --kill-on-bad-exit reports the killed peers of the first node to exit, so the per-node launcher statuses are
  # collected in a file and 75 is taken from there. The launcher starts with SIGUSR1 ignored (a signal during its
  # own start-up would otherwise kill it, an unrequeued failure); its ranks start with it blocked (pending until
  # their handler is in place).
  local status="$CKPT_ROOT/.exit-status-${SLURM_JOB_ID:-0}"
  mkdir -p "$CKPT_ROOT" && rm -f "$status"
  local rc=0
  echo "$(date -u +%FT%TZ) job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "$SLURM_NNODES node(s) x $GPUS_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT"
  MEGATRON_ZERO_EXIT_STATUS_FILE="$status" srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "trap '' USR1; exec \"$PYTHON\" \
    -m megatron_zero.launcher --nnodes $SLURM_NNODES --node-rank \$SLURM_NODEID --nproc-per-node $GPUS_PER_NODE \
    --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $SLURM_JOB_ID $*" || rc=$?
  if [ "$rc" -ne 0 ] && grep -qx 75 "$status" 2>/dev/null && ! grep -qvx 75 "$status"; then rc=75; fi
  rm -f "$status"
  if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "$(date -u +%FT%TZ) stopped early with a checkpoint (exit 75): requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$rc"
}
