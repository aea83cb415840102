"""Where does the aligned merge lose quality, K or V? The recipe of a Calibration run over the model
with only one side merged (the other kept as in the source), everything else unchanged (sequential
calibration, o_proj solve), and the perplexity of the result.

    python scripts/merge_diagnostic.py MODEL --calib CALIB.txt --heldout HELDOUT.txt [--calib-tokens 8192]

MODEL is a transformers folder of a model without k norms (e.g. the output of
`gqa-convert pool SmolLM2-135M-Instruct.Q4_1.gguf -o gqa3 --kv-heads 3`). All kv heads of each layer
are merged into one (MQA), but the merged side is repeated to every kv head so that the model keeps its
kv count: "K only" keeps the source's V heads and o_proj, "V only" its K heads and queries. The whole
model is held in memory (a diagnostic, not the tool). `one_side_perplexities` is what
scripts/ablation.py calls.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gqa_convert.arch import head_dim_of
from gqa_convert.data.text import tokenize_text
from gqa_convert.evaluation import perplexity_of
from gqa_convert.io.sources import open_checkpoint
from gqa_convert.surgery.calibration.activations import calibration_ids
from gqa_convert.surgery.calibration.aligned import aligned_merge
from gqa_convert.surgery.calibration.plans import read_attention
from gqa_convert.surgery.calibration.sequential import LayerCalibration, run_layers
from gqa_convert.surgery.calibration.trials import attention_state
from gqa_convert.surgery.options import Calibration
from gqa_convert.surgery.plan import HeadPlan, contiguous_groups

SIDES = {"K only": ("k",), "V only": ("v",)}


def one_side_model(model: Path, calibration: Calibration, sides: tuple[str, ...]):
    """The source model (float32, in memory) with every layer's attention merged to MQA on `sides` only."""
    from transformers import AutoModelForCausalLM

    checkpoint = open_checkpoint(model)
    config = checkpoint.config
    num_heads, old_kv = int(config.num_attention_heads), checkpoint.kv_heads()
    plan = HeadPlan(num_heads, old_kv, contiguous_groups(old_kv, 1), head_dim_of(config))
    result = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    layers = result.get_submodule(checkpoint.architecture.layers_path)

    def visit(layer: LayerCalibration) -> dict[str, torch.Tensor]:
        attention = read_attention(checkpoint, layer.index, plan)[0].to(layer.device)
        merged = aligned_merge(attention, layer, plan.groups, plan.readers(), calibration, sides)
        state = attention_state(merged.attention, layer.projections)
        module = getattr(layers[layer.index], checkpoint.architecture.attention_module)
        module.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
        return state

    run_layers(checkpoint, calibration_ids(checkpoint, calibration), calibration, key_norm=False, visit=visit)
    return result, checkpoint.tokenizer()


def one_side_perplexities(
    model: Path, calibration: Calibration, texts: dict[str, Path], eval_tokens: int, seq_len: int = 512
) -> dict[str, dict[str, float]]:
    """{"K only": {text name: perplexity}, "V only": {...}}."""
    results = {}
    for label, sides in SIDES.items():
        merged, tokenizer = one_side_model(model, calibration, sides)
        results[label] = {
            name: perplexity_of(merged, tokenize_text(tokenizer, path.read_text(), eval_tokens), seq_len)["perplexity"]
            for name, path in texts.items()
        }
        del merged
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--heldout", type=Path, required=True)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--old", action="store_true", help="the closed-form merge before the current recipe")
    args = parser.parse_args()
    old = (
        dict(key_merge="complex", value_moment="plain", output_ridges=None, sequential=False, refine_steps=0)
        if args.old
        else {}
    )
    calibration = Calibration(data=args.calib, tokens=args.calib_tokens, seq_len=512, **old)
    for label, values in one_side_perplexities(
        args.model, calibration, {"held-out": args.heldout}, args.eval_tokens
    ).items():
        print(f"{label} merged: {values['held-out']:.2f}", flush=True)


if __name__ == "__main__":
    main()
