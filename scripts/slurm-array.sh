#!/usr/bin/env bash
# One sweep over many machines: every Slurm array task runs the same `rnnbench run` and joins it.
# Whichever task starts first creates the studies and MLflow runs; the others never race or wait
# on that. A task that dies (preempted, out of memory, node lost) has its trial retried by the
# others once its lease expires (RNNBENCH_LEASE_SECONDS, default 60).
#
#   export RNNBENCH_STORAGE=postgresql://rnnbench:PASSWORD@db-host/optuna
#   export MLFLOW_TRACKING_URI=http://mlflow-host:5000
#   sbatch --array=0-7 scripts/slurm-array.sh experiments/grid.yaml
#
#SBATCH --job-name=rnnbench
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --output=rnnbench-%A_%a.log
set -euo pipefail

experiment="${1:?usage: sbatch --array=0-N scripts/slurm-array.sh EXPERIMENT.yaml}"
: "${RNNBENCH_STORAGE:?set RNNBENCH_STORAGE=postgresql://user:password@host/db}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI=http://host:5000}"

# Tasks on one node share a hostname; a distinct machine id keeps their leases apart.
export RNNBENCH_MACHINE_ID="${SLURMD_NODENAME:-$(hostname)}-${SLURM_JOB_ID:-0}-${SLURM_ARRAY_TASK_ID:-0}"
# A run home per task, on local disk: it holds only locks and logs when the stores are remote.
home="${TMPDIR:-/tmp}/rnnbench-${SLURM_JOB_ID:-0}-${SLURM_ARRAY_TASK_ID:-0}"

exec rnnbench run "$experiment" \
    --storage "$RNNBENCH_STORAGE" \
    --tracking-uri "$MLFLOW_TRACKING_URI" \
    --home "$home" \
    --workers "${RNNBENCH_WORKERS_PER_GPU:-2}"
