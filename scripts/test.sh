#!/usr/bin/env bash
# Run the test suite from a fresh clone: makes or reuses .venv, installs everything, checks format and
# lint (ruff), runs pytest on two workers (a test file stays on one worker, its module fixtures built once).
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k llama; -n 0 runs in this process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
bash "$ROOT/scripts/setup_clients.sh" "$VENV"
echo "ruff: format and lint"
ruff format --check --quiet gqa_convert tests scripts
ruff check --quiet gqa_convert tests scripts
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GQA_CLIENTS="$VENV/clients"
python -m pytest -q -n "${GQA_TEST_WORKERS:-2}" --dist loadfile "$@"
