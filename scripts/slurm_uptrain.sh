#!/bin/bash
# Uptrain on a Slurm cluster: one task per node, each running `gqa-convert uptrain`, which launches
# Accelerate over the GPUs Slurm granted on its node (one process where it granted none), joined by a
# c10d rendezvous on the first node. A requeued or resubmitted job continues from OUT's last checkpoint.
#
#   MODEL=/shared/llama-gqa8 OUT=/shared/llama-gqa8-up DATA=/shared/corpus TOKENS=20B \
#   GQA_ENV=/shared/gqa-convert/.venv \
#     sbatch --nodes=4 --gpus-per-node=8 --exclusive --time=48:00:00 scripts/slurm_uptrain.sh
#
# Environment:
#   MODEL, OUT, DATA, TOKENS  required: the model folder, output folder, training data, token budget
#   EXTRA_ARGS                more `gqa-convert uptrain` options, split on spaces (e.g. "--seq-len 4096")
#   GQA_ENV                   a virtual environment folder (its bin/activate is sourced) or a file to
#                             source; without it gqa-convert must already be on PATH
#   PROCS_PER_NODE            processes per node; default: the GPUs Slurm granted on the node, or 1
#   PORT                      rendezvous port on the first node; default 20000 + job id % 20000
#
# Resources come from the sbatch command line, not from this file, so that any cluster can run it:
#   --gpus-per-node=K (or --gres=gpu:K)  request GPUs per node: the process count follows the grant.
#                                        Not --gpus=N: Slurm may spread N unevenly over the nodes.
#   --exclusive or --cpus-per-task=C     CPUs: Slurm's default is ONE CPU per task, which K GPU
#                                        processes would share.
#   --time=...                           the partition's default time limit applies otherwise; a job
#                                        cut by its limit continues when resubmitted (--resume).
#
#SBATCH --job-name=gqa-uptrain
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

fail() {
  echo "slurm_uptrain.sh: $*" >&2
  exit 2
}

activate_environment() {
  [[ -z ${GQA_ENV:-} ]] && return 0
  local script=$GQA_ENV
  [[ -d $GQA_ENV ]] && script=$GQA_ENV/bin/activate
  [[ -f $script ]] || fail "GQA_ENV=$GQA_ENV is neither a virtual environment (no bin/activate) nor a file to source"
  set +u  # activate scripts (conda's above all) read unset variables
  # shellcheck disable=SC1090
  source "$script"
  set -u
}

# Count of "type:count" or "count" items, comma separated (SLURM_GPUS_PER_NODE=a100:4 or 4).
sum_counts() {
  local total=0 item count
  IFS=, read -ra items <<<"$1"
  for item in "${items[@]}"; do
    count=${item##*:}
    [[ $count =~ ^[0-9]+$ ]] || return 1
    total=$((total + count))
  done
  echo "$total"
}

# GPUs Slurm granted on this node: SLURM_GPUS_ON_NODE is set for --gpus-per-node, --gres=gpu:K and
# --gpus alike; the other two are fallbacks for older Slurm versions.
granted_gpus() {
  if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]] && sum_counts "$SLURM_GPUS_PER_NODE" >/dev/null; then
    sum_counts "$SLURM_GPUS_PER_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
    IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#devices[@]}"
  else
    echo 0
  fi
}

: "${MODEL:?set MODEL}" "${OUT:?set OUT}" "${DATA:?set DATA}" "${TOKENS:?set TOKENS (e.g. 20B)}"
: "${SLURM_JOB_ID:?submit this script with sbatch}"
activate_environment
command -v gqa-convert >/dev/null || fail "gqa-convert is not on PATH: set GQA_ENV to the environment it is installed in"

NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS=$(granted_gpus)
PROCS_PER_NODE_FORCED=${PROCS_PER_NODE:+1}
PROCS_PER_NODE=${PROCS_PER_NODE:-$((GPUS > 0 ? GPUS : 1))}
[[ $PROCS_PER_NODE =~ ^[1-9][0-9]*$ ]] || fail "PROCS_PER_NODE=$PROCS_PER_NODE is not a positive integer"
WORLD=$((NNODES * PROCS_PER_NODE))
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
HEAD=${HOSTS%%,*}
PORT=${PORT:-$((20000 + SLURM_JOB_ID % 20000))}
read -ra EXTRA <<<"${EXTRA_ARGS:-}"

echo "[$(date '+%F %T')] start: job $SLURM_JOB_ID restart count ${SLURM_RESTART_COUNT:-0}" \
  "nodes $HOSTS; $PROCS_PER_NODE process(es)/node ($GPUS GPU(s) granted), world $WORLD," \
  "head $HEAD:$PORT, ${SLURM_CPUS_ON_NODE:-?} CPU(s) on $(hostname -s)"
if [[ ${SLURM_CPUS_ON_NODE:-} =~ ^[0-9]+$ ]] && ((SLURM_CPUS_ON_NODE < PROCS_PER_NODE)); then
  echo "warning: $SLURM_CPUS_ON_NODE CPU(s) for $PROCS_PER_NODE processes per node:" \
    "submit with --exclusive or --cpus-per-task" >&2
fi

# DATA: best a token folder made once by `gqa-convert tokenize`; raw data is tokenized by the first node
# while the others wait for it (up to --timeout-minutes without progress; pass it in EXTRA_ARGS).
# --resume when OUT holds a run (OUT/checkpoints, made when a run starts): a requeued or resubmitted job
# continues from its last checkpoint; a fresh OUT starts at step 0. Decided once, here, for every node.
RESUME=()
[[ -d $OUT/checkpoints ]] && RESUME=(--resume)
# The machine rank is read on each node, inside the step. A node granted another GPU count than the
# first one would make a wrong world size (a hung rendezvous): it stops instead.
export PROCS_PER_NODE PROCS_PER_NODE_FORCED
# shellcheck disable=SC2016  # expanded by the step's shell, on each node
srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 bash -c '
  if [[ -z ${PROCS_PER_NODE_FORCED:-} && ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ && $SLURM_GPUS_ON_NODE != "$PROCS_PER_NODE" ]]; then
    echo "$(hostname -s): $SLURM_GPUS_ON_NODE GPUs granted here, $PROCS_PER_NODE on the first node:" \
      "request --gpus-per-node, not --gpus" >&2
    exit 2
  fi
  exec gqa-convert uptrain "$@" --machine-rank "$SLURM_NODEID"' _ \
  "$MODEL" -o "$OUT" --data "$DATA" --tokens "$TOKENS" \
  --num-processes "$WORLD" --num-machines "$NNODES" \
  --main-process-ip "$HEAD" --main-process-port "$PORT" "${RESUME[@]}" "${EXTRA[@]}" && status=0 || status=$?
echo "[$(date '+%F %T')] end: job $SLURM_JOB_ID restart count ${SLURM_RESTART_COUNT:-0} exit status $status"
exit "$status"
