"""Where does the aligned merge lose quality, K or V? A recipe run over the model with only one side
merged (the other kept as in the source), everything else as the recipe says (sequential calibration,
o_proj solve), and the perplexity of the result.

    python scripts/research/merge_diagnostic.py MODEL --calib CALIB.txt --heldout HELDOUT.txt [--recipe aligned]

MODEL is a transformers folder of a model without k norms (e.g. the output of
`gqa-convert pool SmolLM2-135M-Instruct.Q4_1.gguf -o gqa3 --kv-heads 3`). All kv heads of each layer
are merged into one (MQA), but the merged side is repeated to every kv head so that the model keeps its
kv count: "K only" keeps the source's V heads and o_proj, "V only" its K heads and queries. The whole
model is held in memory (a diagnostic, not the tool). `one_side_perplexities` is what
scripts/research/ablation.py calls. Public API only: the calibration stream and the aligned merge's
sides (gqa_convert.calibration, gqa_convert.surgery.aligned).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from gqa_convert.arch import head_dim_of
from gqa_convert.calibration import CalibrationStream, CalibrationText, calibration_ids, resolve_device
from gqa_convert.data.text import tokenize_text
from gqa_convert.evaluation import perplexity_of
from gqa_convert.io.sources import open_checkpoint
from gqa_convert.surgery.aligned import (
    ATTENDED_FOR,
    Attention,
    LayerInputs,
    attention_state,
    merge_key_side,
    merge_value_side,
    read_attention,
    repeat_by_group,
    solve_output_side,
)
from gqa_convert.surgery.calibrated import rope_pairs
from gqa_convert.surgery.plan import HeadPlan, contiguous_groups
from gqa_convert.surgery.recipe_files import load_recipe
from gqa_convert.surgery.recipes import Recipe

SIDES = {"K only": "k", "V only": "v"}


def one_side(inputs: LayerInputs, recipe: Recipe, side: str) -> Attention:
    """The layer with one side merged (repeated to every kv head), then the recipe's o_proj solve."""
    attention, groups, settings = inputs.attention, inputs.groups, recipe.aligned
    if side == "v":
        new_v, o = merge_value_side(inputs, settings)
        merged = dataclasses.replace(attention, v=repeat_by_group(new_v, groups, len(attention.v)), o=o)
    else:
        new_k, q, _ = merge_key_side(inputs, settings)
        merged = dataclasses.replace(attention, q=q, k=repeat_by_group(new_k, groups, len(attention.k)))
    if settings.output_ridges is not None:
        merged, _ = solve_output_side(merged, inputs, settings.output_ridges)
    return merged


def one_side_model(model: Path, recipe: Recipe, text: CalibrationText, side: str):
    """The source model (float32, in memory) with every layer's attention merged to MQA on `side` only."""
    from transformers import AutoModelForCausalLM

    checkpoint = open_checkpoint(model)
    config = checkpoint.config
    num_heads, old_kv = int(config.num_attention_heads), checkpoint.kv_heads()
    plan = HeadPlan(num_heads, old_kv, contiguous_groups(old_kv, 1), head_dim_of(config))
    result = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    layers = result.get_submodule(checkpoint.architecture.layers_path)
    pairs, rotary = rope_pairs(checkpoint)
    stream = CalibrationStream(
        checkpoint,
        calibration_ids(checkpoint, text),
        device=resolve_device("auto"),
        sequential=recipe.calibration.sequential,
        attended=ATTENDED_FOR[recipe.aligned.value_moment],
    )
    for index in range(stream.num_layers):
        statistics = stream.collect(index)
        attention = read_attention(checkpoint, index, plan)[0].to(statistics.device)
        inputs = LayerInputs(attention, statistics, plan, pairs, rotary, False, {})
        state = attention_state(one_side(inputs, recipe, side), statistics.projections)
        module = getattr(layers[index], checkpoint.architecture.attention_module)
        module.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
        stream.advance(state)
    return result, checkpoint.tokenizer()


def one_side_perplexities(
    model: Path, recipe: Recipe, text: CalibrationText, texts: dict[str, Path], eval_tokens: int, seq_len: int = 512
) -> dict[str, dict[str, float]]:
    """{"K only": {text name: perplexity}, "V only": {...}}."""
    results = {}
    for label, side in SIDES.items():
        merged, tokenizer = one_side_model(model, recipe, text, side)
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
    parser.add_argument("--recipe", default="aligned", help="a recipe of the aligned method (e.g. closed-form)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    text = CalibrationText("user", (args.calib,), args.calib_tokens, 512)
    for label, values in one_side_perplexities(
        args.model, recipe, text, {"held-out": args.heldout}, args.eval_tokens
    ).items():
        print(f"{label} merged: {values['held-out']:.2f}", flush=True)


if __name__ == "__main__":
    main()
