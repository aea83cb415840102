"""An estimate, from FLOP counts (not a measurement), of what `pool --recipe aligned` costs (sequential
calibration, per-head V moments, frequency-aware K, o_proj solve) and what `--recipe aligned-refined`'s
refinement adds, per model shape and device. Counts what the calibration runs per calibration token and layer:

- the teacher's layer forward; the student's attention forward, then its layer forward after the merge;
- the attended moment: the attention forward for the probabilities, each head's attended inputs
  (2 nh T d) and their second moment (2 nh d^2, float64);
- the o_proj solve's moments: an attention forward, o_proj inputs' moments (float64);
- the plain moment of [x, 1] (float64); three K candidates ranked on one batch of 4 windows;
- per layer, dense decompositions and solves of d x d matrices, taken as DECOMPOSITION d^3 float64;
- the V alternation (float64), an upper bound: VALUE_ROUNDS rounds of CG_STEPS + 1 conjugate-gradient
  products (2 hd d^2 + 2 hd^2 d per query head) and the o blocks' closed form (4 hd d^2 + 4 hd d^2).

- the refinement (recipe aligned-refined: 100 steps per layer, toward the block's output): per step a
  forward and backward of the layer over the training three quarters of the tokens (3 forwards' worth:
  the attention's weight gradients and the input gradients through the MLP), and every 5 steps a
  forward over the held-out quarter (float32).

Eager attention builds the full T x T scores, so the attention core counts 4 T nh hd per token.
Measured on one H200 for comparison (scripts/gpu_check.sh, calibrate-7b, no refinement): the 7B
shape took 4.8 s per layer, about 3x this estimate.

    python scripts/research/aligned_cost.py [--calib-tokens 16384] [--seq-len 512] [--utilization 0.5] [--refine-steps 100]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DECOMPOSITION = 20  # float64 flops of the per-layer decompositions and solves, in units of d^3 (assumed)
TRIAL_TOKENS = 4 * 512  # the K candidates are ranked on one batch of 4 windows
CANDIDATES = 3
VALUE_ROUNDS, CG_STEPS = 4, 20  # as in gqa_convert/surgery/aligned/values.py


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


SHAPES = {
    "SmolLM2-135M (GQA-3)": Shape(576, 30, 9, 3, 64, 1536),
    "Llama-2-7B shape (MHA-32)": Shape(4096, 32, 32, 32, 128, 11008),
    "Llama-2-70B shape (GQA-8)": Shape(8192, 80, 64, 8, 128, 28672),
}
# name: (float32 peak, float64 peak) in TFLOP/s, from the vendors' data sheets (dense, no TF32)
DEVICES = {"A100": (19.5, 19.5), "H100 SXM": (67.0, 67.0)}


def flops_per_layer(shape: Shape, tokens: int, seq_len: int) -> tuple[float, float]:
    """(float32, float64) flops of one layer's calibration over `tokens` tokens."""
    d, nh, hd = shape.hidden, shape.heads, shape.head_dim
    attention_params = d * nh * hd * 2 + 2 * d * shape.kv_heads * hd
    core = 4 * seq_len * nh * hd
    attention = 2 * attention_params + core
    layer = 2 * (attention_params + 3 * d * shape.intermediate) + core
    attended = attention + 2 * nh * seq_len * (d + 1)
    per_token32 = layer + attention + layer + attended + attention
    per_token64 = 2 * (d + 1) ** 2 + 2 * nh * (d + 1) ** 2 + 2 * (nh * hd) ** 2 + 2 * (nh * hd) * d
    fp32 = per_token32 * tokens + CANDIDATES * attention * TRIAL_TOKENS
    width = d + 1
    product = 2 * hd * width**2 + 2 * hd**2 * width
    blocks = 4 * hd * width**2 + 4 * hd * width * d
    alternation = nh * (VALUE_ROUNDS * ((CG_STEPS + 1) * product + blocks) + blocks)
    return fp32, per_token64 * tokens + DECOMPOSITION * d**3 + alternation


def refine_flops_per_layer(shape: Shape, tokens: int, seq_len: int, steps: int) -> float:
    """float32 flops of `steps` refinement steps of one layer toward its block output."""
    d, nh, hd = shape.hidden, shape.heads, shape.head_dim
    attention_params = d * nh * hd * 2 + 2 * d * shape.kv_heads * hd
    layer = 2 * (attention_params + 3 * d * shape.intermediate) + 4 * seq_len * nh * hd
    return steps * (3 * layer * 0.75 * tokens + layer * 0.25 * tokens / 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--utilization", type=float, default=0.5, help="fraction of the peak rates sustained")
    parser.add_argument("--refine-steps", type=int, default=100, help="refinement steps per layer (0: none)")
    args = parser.parse_args()
    print(f"calibration tokens {args.calib_tokens}, windows of {args.seq_len}, {args.utilization:.0%} of peak")
    for name, shape in SHAPES.items():
        fp32, fp64 = (shape.layers * f for f in flops_per_layer(shape, args.calib_tokens, args.seq_len))
        refine = shape.layers * refine_flops_per_layer(shape, args.calib_tokens, args.seq_len, args.refine_steps)
        parts = []
        for device, (peak32, peak64) in DEVICES.items():
            seconds = (fp32 / peak32 + fp64 / peak64) / (args.utilization * 1e12)
            refining = refine / peak32 / (args.utilization * 1e12)
            parts.append(f"{device} ~{_duration(seconds)} + refinement ~{_duration(refining)}")
        print(
            f"{name}: {fp32 / 1e12:,.1f} TFLOP float32 + {fp64 / 1e12:,.2f} TFLOP float64, refinement "
            f"{refine / 1e12:,.0f} TFLOP float32; " + ", ".join(parts)
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
