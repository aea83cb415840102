"""Where does the aligned merge lose quality, K or V? Merges one side only and measures perplexity.

    python scripts/merge_diagnostic.py MODEL --calib CALIB.txt --heldout HELDOUT.txt [--calib-tokens 8192]

MODEL is a GQA Llama-style transformers folder without attention biases (e.g. the output of
`gqa-convert pool SmolLM2-135M-Instruct.Q4_1.gguf -o gqa3 --kv-heads 3`).
All kv heads of each layer are merged into one (MQA) by the aligned method, but the merged K (or V)
is repeated so the model keeps its kv count: "K only" keeps the original V heads, "V only" the
original K heads. The whole model is held in memory (a diagnostic, not the tool).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa_convert.data.text import tokenize_text
from gqa_convert.evaluate import perplexity_of
from gqa_convert.surgery.calibration.aligned import Attention, merge_keys, merge_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calib = tokenize_text(tokenizer, open(args.calib).read(), args.calib_tokens)
    heldout = tokenize_text(tokenizer, open(args.heldout).read(), args.eval_tokens)
    config = model.config
    nh, nkv, hd, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    moments = [torch.zeros(d + 1, d + 1, dtype=torch.float64) for _ in model.model.layers]

    def hook(index):
        def accumulate(module, args_, kwargs):
            x = kwargs["hidden_states"].reshape(-1, d).double()
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            moments[index].add_(x.T @ x)

        return accumulate

    handles = [
        layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for start in range(0, len(calib) - 511, 512):
            model(input_ids=calib[start : start + 512][None])
    for handle in handles:
        handle.remove()
    print(f"original: {perplexity_of(model, heldout, 512)['perplexity']:.2f}", flush=True)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [tuple(range(nkv))]
    readers = {k: list(range(k * nh // nkv, (k + 1) * nh // nkv)) for k in range(nkv)}

    def attention(layer) -> Attention:
        a = layer.self_attn

        def heads(weight, count):
            return torch.cat([weight.double(), torch.zeros(len(weight), 1, dtype=torch.float64)], 1).reshape(
                count, hd, -1
            )

        return Attention(
            heads(a.q_proj.weight, nh),
            heads(a.k_proj.weight, nkv),
            heads(a.v_proj.weight, nkv),
            a.o_proj.weight.double().reshape(d, nh, hd),
            False,
            False,
            False,
        )

    for label, merge_k, merge_v in (("K only", True, False), ("V only", False, True), ("K and V", True, True)):
        model.load_state_dict(original)
        with torch.no_grad():
            for index, layer in enumerate(model.model.layers):
                a = attention(layer)
                if merge_v:
                    new_v, new_o = merge_values(a, moments[index], groups, readers)
                    layer.self_attn.v_proj.weight.copy_(new_v[:, :, :-1].reshape(-1, d).repeat(nkv, 1).float())
                    layer.self_attn.o_proj.weight.copy_(new_o.reshape(d, -1).float())
                if merge_k:
                    new_k, new_q = merge_keys(a, moments[index], groups, readers, hd)
                    layer.self_attn.k_proj.weight.copy_(new_k[:, :, :-1].reshape(-1, d).repeat(nkv, 1).float())
                    layer.self_attn.q_proj.weight.copy_(new_q[:, :, :-1].reshape(-1, d).float())
        print(f"{label} merged: {perplexity_of(model, heldout, 512)['perplexity']:.2f}", flush=True)


if __name__ == "__main__":
    main()
