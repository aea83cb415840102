#!/usr/bin/env bash
# Fetch, once, the independent clients the compatibility tests check outputs against, into VENV/clients
# (ignored by git): transformers 4.57 as an overlay on the venv's torch, and llama.cpp's HF -> GGUF
# converter from the llama-cpp-python sdist that vendors it (2 MB kept of 77 MB). Each step leaves a
# marker only when it succeeded; without it the tests skip and say why.
set -uo pipefail
VENV="${1:?usage: setup_clients.sh VENV}"
CLIENTS="$VENV/clients"
mkdir -p "$CLIENTS"
pip_quiet() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if [ ! -f "$CLIENTS/transformers-4.57/.complete" ]; then
  echo "fetching transformers 4.57 (client check)"
  rm -rf "$CLIENTS/transformers-4.57"
  pip_quiet install --no-deps --target "$CLIENTS/transformers-4.57" \
    "transformers==4.57.6" "tokenizers==0.22.2" "huggingface_hub==0.36.2"
  PYTHONPATH="$CLIENTS/transformers-4.57" "$VENV/bin/python" -c \
    "import transformers; assert transformers.__version__ == '4.57.6'" 2>/dev/null \
    && touch "$CLIENTS/transformers-4.57/.complete"
fi
if [ ! -f "$CLIENTS/llama.cpp/.complete" ]; then
  echo "fetching llama.cpp's converter (client check)"
  rm -rf "$CLIENTS/llama.cpp" "$CLIENTS/sdist"
  pip_quiet download --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$CLIENTS/sdist"
  mkdir -p "$CLIENTS/llama.cpp"
  tar xzf "$CLIENTS"/sdist/llama_cpp_python-*.tar.gz -C "$CLIENTS/llama.cpp" --strip-components=3 --wildcards \
    'llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py' 'llama_cpp_python-*/vendor/llama.cpp/conversion/*' \
    'llama_cpp_python-*/vendor/llama.cpp/gguf-py/gguf/*' 'llama_cpp_python-*/vendor/llama.cpp/LICENSE' 2>/dev/null \
    && touch "$CLIENTS/llama.cpp/.complete"
  rm -rf "$CLIENTS/sdist"
fi
exit 0
