#!/bin/bash
# Uptrain on a SLURM cluster: one task per node, each launching Accelerate over its GPUs, joined by
# a c10d rendezvous on the first node. Preempted or requeued jobs continue from the last checkpoint.
#
#   MODEL=/shared/llama-gqa8 OUT=/shared/llama-gqa8-uptrained DATA=/shared/corpus TOKENS=20B \
#     sbatch --nodes=4 scripts/slurm_uptrain.sh
#
#SBATCH --job-name=gqa-uptrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
: "${MODEL:?set MODEL}" "${OUT:?set OUT}" "${DATA:?set DATA}" "${TOKENS:?set TOKENS (e.g. 20B)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
WORLD=$((SLURM_NNODES * GPUS_PER_NODE))

# DATA: best a token folder made once by `gqa-convert tokenize`; raw data is tokenized by the first node
# while the others wait for it (up to --timeout-minutes without progress; pass it in EXTRA_ARGS).
# --resume: a fresh OUT starts at step 0, a requeued job continues from its last checkpoint.
# SLURM_NODEID is evaluated on each node, inside srun.
srun --kill-on-bad-exit=1 bash -c "gqa-convert uptrain '$MODEL' -o '$OUT' --data '$DATA' --tokens '$TOKENS' \
  --num-processes $WORLD --num-machines $SLURM_NNODES --machine-rank \$SLURM_NODEID \
  --main-process-ip $HEAD --main-process-port $PORT --resume ${EXTRA_ARGS:-}"
