#!/bin/bash
# End-to-end check of scripts/slurm_uptrain.sh under a real one-node Slurm (not run by CI):
# starts private munged, slurmctld and slurmd (own key, socket, ports and state in a temporary
# folder), submits an uptraining job on a tiny model, requeues it after its first checkpoint and
# checks that the job continued where it stopped and finished with the right model.
#
#   sudo bash scripts/test_slurm.sh [REPO]          # REPO defaults to this script's folder/..
#
# Root is needed (slurmd starts jobs); Debian/Ubuntu's slurm-wlm and munge are installed if missing.
# Takes about 4-6 minutes, 2 of them waiting: Slurm holds a requeued job ~2 minutes before restarting it.
# Environment:
#   GQA_ENV      the environment with gqa-convert (venv folder or file to source); default REPO/.venv
#   JOB_SCRIPT   the job script under test; default REPO/scripts/slurm_uptrain.sh
#   TEST_TOKENS  training budget; default 819200 (6400 steps of 4 x 32 tokens, ~1-2 min of training)
#   TEST_TIMEOUT seconds allowed for each wait (first checkpoint, restart, end); default 1200
#   TEST_PORT    slurmctld port (slurmd gets the next one); default 16817
#   KEEP=1       keep the temporary folder (it is always kept when a check fails)
set -euo pipefail

REPO=$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd)
JOB_SCRIPT=${JOB_SCRIPT:-$REPO/scripts/slurm_uptrain.sh}
export GQA_ENV=${GQA_ENV:-$REPO/.venv}
TOKENS=${TEST_TOKENS:-819200}
TIMEOUT=${TEST_TIMEOUT:-1200}
SEQ_LEN=32 MICRO_BATCH=4 SAVE_EVERY=1000
STEPS=$(((TOKENS + SEQ_LEN * MICRO_BATCH - 1) / (SEQ_LEN * MICRO_BATCH)))
CTLD_PORT=${TEST_PORT:-16817}
NODE=$(hostname -s)
FAILURES=0
JOB="" MUNGED_PID="" SLURMCTLD_PID="" SLURMD_PID="" TMP=""

log() { echo "[$(date '+%T')] $*"; }
pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  FAILURES=$((FAILURES + 1))
}
die() {
  fail "$*"
  exit 1
}

install_slurm() {
  local command missing=0
  for command in munged slurmctld slurmd sbatch; do
    command -v "$command" >/dev/null || missing=1
  done
  ((missing)) || return 0
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

activate_environment() {
  local script=$GQA_ENV
  [[ -d $GQA_ENV ]] && script=$GQA_ENV/bin/activate
  [[ -f $script ]] || die "GQA_ENV=$GQA_ENV: no environment there (make REPO/.venv or point GQA_ENV at one)"
  set +u
  # shellcheck disable=SC1090
  source "$script"
  set -u
}

job_field() {  # one field of `scontrol show job`, e.g. JobState
  scontrol show job "$JOB" -o 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p"
}

job_finished() {
  case $(job_field JobState) in
  COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED | "") return 0 ;;
  *) return 1 ;;
  esac
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local limit=$1 what=$2 started=$SECONDS
  shift 2
  until "$@"; do
    ((SECONDS - started < limit)) || die "timed out after ${limit}s waiting for $what"
    daemons_alive
    sleep 1
  done
}

daemons_alive() {  # stop early, with the log to read, when a daemon this script started has died
  local name pid
  for name in munged slurmctld slurmd; do
    pid=${name^^}_PID
    pid=${!pid}
    [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || die "$name exited: see $TMP/log/$name.log and $TMP/log/$name.out"
  done
}

stop_pid() {  # stop_pid NAME PID: terminate one daemon this script started, and reap it
  local name=$1 pid=$2 tries=0
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && ((tries++ < 30)); do sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
  log "stopped $name (pid $pid)"
}

cleanup() {
  local status=$?
  set +e
  if [[ -n $JOB ]] && ! job_finished; then
    log "cancelling job $JOB"
    scancel "$JOB"
    for _ in $(seq 60); do job_finished && break; sleep 1; done
  fi
  stop_pid slurmd "$SLURMD_PID"
  stop_pid slurmctld "$SLURMCTLD_PID"
  stop_pid munged "$MUNGED_PID"
  if [[ -n $TMP ]]; then
    if ((status == 0 && FAILURES == 0)) && [[ -z ${KEEP:-} ]]; then
      rm -rf "$TMP"
    else
      echo "kept $TMP (daemon logs in $TMP/log)"
    fi
  fi
  ((status == 0 && FAILURES > 0)) && status=1
  exit "$status"
}

start_munge() {
  # munged wants its key readable by its user only, and the socket's folder (and every folder
  # above it) searchable by all: the key and the socket live in separate folders.
  chmod 711 "$TMP"
  mkdir -m 700 "$TMP/munge-key"
  mkdir -m 755 "$TMP/munge"
  dd if=/dev/urandom of="$TMP/munge-key/munge.key" bs=1024 count=1 status=none
  chmod 400 "$TMP/munge-key/munge.key"
  munged --foreground --key-file="$TMP/munge-key/munge.key" --socket="$TMP/munge/munge.socket" \
    --pid-file="$TMP/munge-key/munged.pid" --seed-file="$TMP/munge-key/munged.seed" \
    --log-file="$TMP/log/munged.log" >>"$TMP/log/munged.log" 2>&1 &
  MUNGED_PID=$!
  wait_for 20 "munged" bash -c "munge -n -S '$TMP/munge/munge.socket' 2>/dev/null | unmunge -S '$TMP/munge/munge.socket' >/dev/null 2>&1"
  log "munged running (pid $MUNGED_PID)"
}

write_slurm_conf() {
  mkdir -p "$TMP/etc" "$TMP/state" "$TMP/spool" "$TMP/run"
  : >"$TMP/etc/plugstack.conf"
  cat >"$TMP/etc/slurm.conf" <<EOF
ClusterName=gqatest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$TMP/munge/munge.socket
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool
SlurmctldPidFile=$TMP/run/slurmctld.pid
SlurmdPidFile=$TMP/run/slurmd.pid
SlurmctldLogFile=$TMP/log/slurmctld.log
SlurmdLogFile=$TMP/log/slurmd.log
PlugStackConfig=$TMP/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$TMP/etc/slurm.conf
}

quiet() { "$@" >/dev/null 2>&1; }

node_idle() { [[ $(sinfo -h -n "$NODE" -o %T 2>/dev/null) == idle ]]; }

start_slurm() {
  slurmctld -D -i -f "$SLURM_CONF" >>"$TMP/log/slurmctld.out" 2>&1 &
  SLURMCTLD_PID=$!
  wait_for 30 "slurmctld" quiet scontrol ping
  slurmd -D -N "$NODE" -f "$SLURM_CONF" >>"$TMP/log/slurmd.out" 2>&1 &
  SLURMD_PID=$!
  wait_for 60 "node $NODE to be idle" node_idle
  log "slurmctld (pid $SLURMCTLD_PID) and slurmd (pid $SLURMD_PID) running; node $NODE idle"
}

build_model() {
  python - "$REPO/tests" "$TMP/model" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from tiny_models import build_trainable

build_trainable(Path(sys.argv[2]), "llama")
EOF
}

checkpoint_complete() { compgen -G "$TMP/out/checkpoints/step-*/COMPLETE" >/dev/null || job_finished; }
running_again() { [[ $(job_field Restarts) -ge 1 && $(job_field JobState) == RUNNING ]] || job_finished; }

last_step() { tail -n 1 "$TMP/out/metrics.jsonl" 2>/dev/null | python -c "import json,sys; print(json.loads(sys.stdin.read() or '{\"step\": 0}')['step'])"; }

check_results() {
  local output=$TMP/work/gqa-uptrain-$JOB.out
  if [[ $(job_field JobState) == COMPLETED ]]; then
    pass "job $JOB COMPLETED"
  else
    fail "job $JOB ended $(job_field JobState) (exit $(job_field ExitCode))"
  fi
  if [[ $(job_field Restarts) == 1 ]]; then
    pass "job restarted once (scontrol: Restarts=1)"
  else
    fail "scontrol: Restarts=$(job_field Restarts), expected 1"
  fi
  python - "$TMP/out" "$STEPS" "$((STEPS * SEQ_LEN * MICRO_BATCH))" <<'EOF' || FAILURES=$((FAILURES + 1))
import json
import sys
from pathlib import Path

out, steps, tokens = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
seen = [row["step"] for row in rows]
ok = seen == list(range(1, steps + 1))
print(("PASS" if ok else "FAIL") + f": metrics.jsonl has steps 1..{steps} exactly once ({len(seen)} rows)")
ok_tokens = rows[-1]["tokens"] == tokens
print(("PASS" if ok_tokens else "FAIL") + f": final tokens {rows[-1]['tokens']:,} == budget {tokens:,}")
sys.exit(0 if ok and ok_tokens else 1)
EOF
  local starts0 starts1
  starts0=$(grep -c "start: job $JOB restart count 0 " "$output" || true)
  starts1=$(grep -c "start: job $JOB restart count 1 " "$output" || true)
  if [[ $starts0 == 1 && $starts1 == 1 ]] && grep -n "start: job" "$output" | head -1 | grep -q "restart count 0"; then
    pass "log $output holds both starts (restart count 0, then 1): appended, not overwritten"
  else
    fail "log $output: $starts0 first start(s), $starts1 restart(s); expected one of each"
  fi
  if grep -q "resumed from step-" "$output"; then
    pass "the restart resumed: $(grep -o 'resumed from step-[0-9]*: step [0-9]*' "$output" | head -1)"
  else
    fail "no 'resumed from step-' in $output"
  fi
  python - "$TMP/out" <<'EOF' || FAILURES=$((FAILURES + 1))
import sys

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
with torch.no_grad():
    logits = model(input_ids=torch.arange(3, 19).unsqueeze(0)).logits
ok = bool(torch.isfinite(logits).all()) and model.config.num_key_value_heads == 2
print(("PASS" if ok else "FAIL") + f": final model loads with transformers ({type(model).__name__}, "
      f"{model.config.num_key_value_heads} kv heads, finite logits {tuple(logits.shape)})")
sys.exit(0 if ok else 1)
EOF
} 2>>"$TMP/log/checks.log"

main() {
  [[ $(id -u) == 0 ]] || die "run as root (sudo): slurmd must be root to start jobs"
  [[ -f $JOB_SCRIPT ]] || die "no job script at $JOB_SCRIPT"
  install_slurm
  activate_environment
  command -v gqa-convert >/dev/null || die "gqa-convert is not on PATH in GQA_ENV=$GQA_ENV"
  TMP=$(mktemp -d /tmp/gqa-slurm-test.XXXXXX)
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$TMP/log" "$TMP/work"
  log "repo $REPO, job script $JOB_SCRIPT, GQA_ENV $GQA_ENV, temporary folder $TMP"
  start_munge
  write_slurm_conf
  start_slurm
  build_model >>"$TMP/log/build_model.log" 2>&1
  log "tiny model built in $TMP/model; budget $TOKENS tokens = $STEPS steps, checkpoint every $SAVE_EVERY"

  # One thread per process: on a loaded machine two OpenMP threads made the tiny model 6x slower.
  JOB=$(cd "$TMP/work" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MODEL=$TMP/model OUT=$TMP/out DATA=$REPO/tests/data/sample.txt TOKENS=$TOKENS \
    EXTRA_ARGS="--seq-len $SEQ_LEN --micro-batch-size $MICRO_BATCH --lr 1e-3 --save-every $SAVE_EVERY" \
    sbatch --parsable --nodes=1 "$JOB_SCRIPT") || die "sbatch refused $JOB_SCRIPT (its error is above)"
  JOB=${JOB%%;*}
  log "submitted job $JOB"
  wait_for "$TIMEOUT" "the first complete checkpoint" checkpoint_complete
  job_finished && die "job $JOB ended ($(job_field JobState)) before it could be requeued: raise TEST_TOKENS"
  local step_at_requeue
  step_at_requeue=$(last_step)
  [[ $step_at_requeue -lt $STEPS ]] || die "training already reached step $STEPS: raise TEST_TOKENS"
  log "checkpoint $(basename "$(dirname "$(compgen -G "$TMP/out/checkpoints/step-*/COMPLETE" | head -1)")") complete at step $step_at_requeue of $STEPS: scontrol requeue $JOB"
  scontrol requeue "$JOB"
  wait_for "$TIMEOUT" "job $JOB to restart" running_again
  log "job $JOB running again (Restarts=$(job_field Restarts))"
  wait_for "$TIMEOUT" "job $JOB to finish" job_finished
  log "job $JOB finished: $(job_field JobState)"

  echo "----- job log $TMP/work/gqa-uptrain-$JOB.out ('data exhausted' lines counted, not shown) -----"
  grep -v "data exhausted" "$TMP/work/gqa-uptrain-$JOB.out" || true
  echo "($(grep -c "data exhausted" "$TMP/work/gqa-uptrain-$JOB.out" || true) 'data exhausted: starting epoch' lines)"
  echo "----- checks -----"
  check_results
  if ((FAILURES == 0)); then
    log "all checks passed in ${SECONDS}s"
  else
    log "$FAILURES check(s) failed after ${SECONDS}s"
  fi
}

main
