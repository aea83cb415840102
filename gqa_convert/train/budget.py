"""Token budgets: look up published pre-training budgets, and turn a
budget into optimizer steps. Every position of a packed block counts as a trained token."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gqa_convert.errors import GQAConvertError
from gqa_convert.io.provenance import read_record
from gqa_convert.units import parse_tokens

# Published pre-training tokens (model cards and papers). Keys match a lower-case model name.
KNOWN_PRETRAINING_TOKENS = {
    "smollm2-135m": 2 * 10**12,
    "llama-7b": 10**12,
    "llama-13b": 10**12,
    "llama-30b": 14 * 10**11,
    "llama-33b": 14 * 10**11,
    "llama-65b": 14 * 10**11,
    "llama-2-7b": 2 * 10**12,
    "llama-2-13b": 2 * 10**12,
    "llama-2-70b": 2 * 10**12,
    "olmo-1b": 3 * 10**12,
    "olmo-7b": 246 * 10**10,
    "phi-2": 14 * 10**11,
    "pythia": 300 * 10**9,
    "stablelm-3b-4e1t": 4 * 10**12,
    "gemma-7b": 6 * 10**12,
    "qwen-7b": 24 * 10**11,
}


def known_pretraining_tokens(model_folder: Path) -> tuple[int, str] | None:
    """The published budget of the model this folder was converted from, if the table knows it."""
    names = [model_folder.resolve().name]
    record = read_record(model_folder)
    if record is not None:
        names.insert(0, Path(str(record.get("source", ""))).name)
    for name in names:
        normalized = name.lower().replace("_", "-")
        for key in sorted(KNOWN_PRETRAINING_TOKENS, key=len, reverse=True):
            if key in normalized:
                return KNOWN_PRETRAINING_TOKENS[key], key
    return None


@dataclass(frozen=True)
class Budget:
    tokens_requested: int
    steps: int
    global_batch_tokens: int  # micro_batch x grad_accum x processes x seq_len
    origin: str  # how the budget was decided, for the plan and the provenance

    @property
    def tokens(self) -> int:
        """What training will consume: whole steps, so at most one step above the request."""
        return self.steps * self.global_batch_tokens


def resolve_budget(
    model_folder: Path, tokens: str | None, fraction: float, original_tokens: str | None, global_batch_tokens: int
) -> Budget:
    if tokens is not None:
        requested, origin = parse_tokens(tokens), f"--tokens {tokens}"
    else:
        if not 0 < fraction <= 1:
            raise GQAConvertError(f"--fraction {fraction} must be in (0, 1]")
        if original_tokens is not None:
            base, source = parse_tokens(original_tokens), f"--original-tokens {original_tokens}"
        else:
            known = known_pretraining_tokens(model_folder)
            if known is None:
                raise GQAConvertError(
                    "the original pre-training budget of this model is not known: "
                    "pass --tokens N, or --original-tokens N with --fraction"
                )
            base, source = known[0], f"published budget of {known[1]}"
        requested, origin = int(base * fraction), f"{fraction:g} x {base:,} tokens ({source})"
    if requested < global_batch_tokens:
        raise GQAConvertError(
            f"the budget ({requested:,} tokens) is smaller than one optimizer step ({global_batch_tokens:,} "
            "tokens): raise --tokens or lower --micro-batch-size, --grad-accum or --seq-len"
        )
    steps = math.ceil(requested / global_batch_tokens)
    return Budget(requested, steps, global_batch_tokens, origin)
