#!/usr/bin/env bash
# Multi-node training under Slurm: one `torchrun` per node, all meeting at a c10d rendezvous
# on the first node of the allocation. Every prepretrain command and key=value works:
#
#   sbatch --nodes=4 scripts/slurm_train.sh mae --config configs/mae_vit_h14.yaml out_dir=/shared/runs/mae_h14
#   GPUS_PER_NODE=4 sbatch --nodes=2 --gpus-per-node=4 scripts/slurm_train.sh wsp strategy=fsdp ...
#
# out_dir must be on a filesystem every node sees: sharded checkpoints are written by all ranks.
#SBATCH --job-name=prepretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
# SIGTERM 3 minutes before the time limit: every rank checkpoints at its next step boundary and
# exits with code 75; resubmit (or requeue) the same command to resume. Untested on a real cluster.
#SBATCH --signal=TERM@180

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch --nodes=N $0 <command> [--config FILE] [key=value ...]" >&2
    exit 2
fi

GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
NNODES="${SLURM_NNODES:-1}"
RDZV_HOST="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
RDZV_PORT="${RDZV_PORT:-29500}"
CPUS_PER_NODE="${SLURM_CPUS_PER_TASK:-$(nproc)}"

# Data-loader workers use processes, not threads: one thread each keeps the cores for decoding.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# NCCL: report failures instead of hanging; the collective timeout itself is dist_timeout_s=.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"

echo "prepretrain: ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), rendezvous ${RDZV_HOST}:${RDZV_PORT}," \
     "job ${SLURM_JOB_ID:-local}, ${CPUS_PER_NODE} CPUs per node"

# srun starts this once per node; torchrun then starts one process per GPU and sets
# RANK / LOCAL_RANK / WORLD_SIZE, which prepretrain reads. --max-restarts=0: a failed rank
# ends the job (resume is from the newest checkpoint, by running the same command again).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="${NNODES}" \
    --nproc-per-node="${GPUS_PER_NODE}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${RDZV_HOST}:${RDZV_PORT}" \
    --rdzv-id="${SLURM_JOB_ID:-prepretrain}" \
    --max-restarts=0 \
    -m prepretrain.cli "$@"
