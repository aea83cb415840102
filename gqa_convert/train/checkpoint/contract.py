"""The resume contract, in one table: for every option of `uptrain`, whether it must stay the same on
--resume (its value is recorded with each checkpoint and compared), may change (it applies from the
resumed step), or is refused with --resume. check_compatible() enforces the table; contract_markdown()
renders it into docs/uptrain.md (a test keeps the two equal)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_convert.data.manifest import read_manifest
from gqa_convert.errors import GQAConvertError
from gqa_convert.train.settings import TrainSettings

MUST_STAY = "must stay"
STAYS_UNDER_DEEPSPEED = "must stay under deepspeed"
MAY_CHANGE = "may change"
REFUSED = "refused"


@dataclass(frozen=True)
class Facts:
    """What a run's identity is computed from (resolved by train.plan)."""

    settings: TrainSettings
    model: str
    teacher: str | None
    global_batch: int
    steps: int
    data: str
    checkpoint_format: str
    world: int
    precision: str


@dataclass(frozen=True)
class Term:
    options: tuple[str, ...]  # the TrainSettings fields it covers
    rule: str
    why: str
    key: str | None = None  # recorded in trainer_state.json under "run" (terms that must stay)
    value: Callable[[Facts], Any] | None = None
    shown: str = "{}"  # a recorded value, for people


def _distillation(name: str) -> Callable[[Facts], Any]:
    return lambda facts: getattr(facts.settings, name) if facts.settings.teacher else None


CONTRACT: tuple[Term, ...] = (
    Term(("model",), MUST_STAY, "the checkpoint holds its weights, tensor for tensor; its tokenizer made the data",
         "model", lambda f: f.model, "a model {}"),
    Term(("seq_len",), MUST_STAY, "the data is cut into blocks of this length", "seq_len",
         lambda f: f.settings.seq_len, "--seq-len {}"),
    Term(("micro_batch_size", "grad_accum", "global_batch_tokens"), MUST_STAY,
         "the global batch (micro-batch x accumulation x processes) decides which blocks each step trains on; "
         "its split may change", "global_batch", lambda f: f.global_batch, "a global batch of {} sequences"),
    Term(("data", "text_column", "data_config", "split"), MUST_STAY,
         "the blocks each step trains on; data is named by content (tokens and shards), not by path", "data",
         lambda f: f.data, "data of {}"),
    Term(("tokens", "fraction", "original_tokens"), MUST_STAY,
         "the budget's step count: the learning-rate schedule and where training ends", "steps",
         lambda f: f.steps, "{} steps"),
    Term(("seed",), MUST_STAY, "the order of the blocks", "seed", lambda f: f.settings.seed, "--seed {}"),
    Term(("trainable",), MUST_STAY, "the optimizer state is held for these parameters only", "trainable",
         lambda f: f.settings.trainable, "--trainable {}"),
    Term(("teacher",), MUST_STAY, "the objective: a teacher added, removed or replaced changes it", "teacher",
         lambda f: f.teacher, "teacher {}"),
    Term(("distill_weight",), MUST_STAY, "the objective", "distill_weight", _distillation("distill_weight"),
         "--distill-weight {}"),
    Term(("distill_temperature",), MUST_STAY, "the objective", "distill_temperature",
         _distillation("distill_temperature"), "--distill-temperature {}"),
    Term(("strategy",), MUST_STAY,
         "the checkpoint's format: ddp and fsdp2 write the same one (each resumes the other), deepspeed its own",
         "format", lambda f: f.checkpoint_format, "a {} checkpoint"),
    Term(("num_processes",), STAYS_UNDER_DEEPSPEED,
         "ddp and fsdp2 checkpoints are resharded onto any number of processes (keep the global batch, e.g. "
         "with --global-batch-tokens); DeepSpeed's partitions are not", "world", lambda f: f.world, "{} processes"),
    Term(("mixed_precision",), STAYS_UNDER_DEEPSPEED,
         "ddp and fsdp2 keep fp32 weights and optimizer state in any precision", "precision",
         lambda f: f.precision, "precision {}"),
    Term(("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip"), MAY_CHANGE,
         "applies from the resumed step"),
    Term(("gradient_checkpointing", "compile"), MAY_CHANGE,
         "memory or speed against compute; the same numbers (compiled: up to float rounding)"),
    Term(("save_every", "keep_checkpoints"), MAY_CHANGE, "applies to the checkpoints written from now on"),
    Term(("eval_data", "eval_every", "eval_tokens", "report_to", "source_perplexity"), MAY_CHANGE,
         "what is measured and where it goes"),
    Term(("measure", "gpu", "gpu_memory", "tokens_per_second", "mfu"), MAY_CHANGE,
         "read by --dry-run's plan only"),
    Term(("num_machines", "machine_rank", "main_process_ip", "main_process_port", "accelerate_config",
          "timeout_minutes", "dry_run"), MAY_CHANGE, "how the processes are started"),
    Term(("out", "resume"), REFUSED,
         "OUT without a run (OUT/checkpoints): an empty OUT, or one holding only a model; a checkpoint "
         "written by an earlier version. A finished run resumed only exports, if its export is missing"),
    Term(("force",), REFUSED, "with --resume: one continues the run, the other replaces it"),
    Term(("trust_deepspeed_checkpoint",), REFUSED,
         "a DeepSpeed checkpoint without this flag: its files are pickles, which run code when loaded "
         "(ddp and fsdp2 checkpoints are safetensors and JSON)"),
)  # fmt: skip
RECORDED = tuple(term for term in CONTRACT if term.key is not None)


def model_identity(config: Any, tokenizer_fingerprint: str | None = None) -> str:
    """A model named by what defines it (its config, and its tokenizer), not by its path."""
    settings = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash"):
        settings.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    tokenizer = f", tokenizer {tokenizer_fingerprint[:12]}" if tokenizer_fingerprint else ""
    return f"{config.model_type} (vocab {config.vocab_size}, config {digest}{tokenizer})"


def token_data_identity(folder: str) -> str:
    """The tokens a run reads, named by content (token count and shard list), not by where they lie."""
    manifest = read_manifest(Path(folder))
    shards = json.dumps(manifest["shards"], sort_keys=True).encode()
    return f"{manifest['tokens']} tokens (shards {hashlib.sha256(shards).hexdigest()[:12]})"


def run_identity(settings: TrainSettings, **facts: Any) -> dict[str, Any]:
    """The values of the terms that must stay, as each checkpoint records them. `data` is a token
    folder, or None before the data is tokenized (its term is then left out)."""
    data = token_data_identity(facts["data"]) if facts["data"] is not None else None
    resolved = Facts(settings=settings, **{**facts, "data": data})
    return {term.key: term.value(resolved) for term in RECORDED if not (term.key == "data" and data is None)}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], checkpoint: str) -> None:
    """Refuse, in one line listing each difference, to resume a checkpoint with settings it cannot take
    (the terms `current` holds: all of them once the data is known)."""
    deepspeed = saved.get("format") == "deepspeed" == current["format"]
    changed = [
        term
        for term in RECORDED
        if term.key in current
        and (term.rule == MUST_STAY or (term.rule == STAYS_UNDER_DEEPSPEED and deepspeed))
        and saved.get(term.key) != current[term.key]
    ]
    if changed:
        before = ", ".join(_shown(term, saved.get(term.key)) for term in changed)
        now = ", ".join(_shown(term, current[term.key]) for term in changed)
        raise GQAConvertError(
            f"--resume: {checkpoint} was trained with {before}; this run has {now}. Resume with the checkpoint's "
            "settings (see the resume contract: gqa-convert's docs/uptrain.md), or start afresh with --force"
        )


def _shown(term: Term, value: Any) -> str:
    if term.key == "teacher" and value is None:
        return "no teacher"
    if term.key.startswith("distill_") and value is None:
        return f"{term.shown.split()[0]} (no teacher)"
    return term.shown.format(value)


def contract_markdown() -> str:
    """The table as docs/uptrain.md shows it."""
    import dataclasses

    from gqa_convert.options import flag_name, spec_of

    specs = {field.name: spec_of(field) for field in dataclasses.fields(TrainSettings)}
    shown = {name: name.upper() if spec.argument else flag_name(name) for name, spec in specs.items()}
    lines = ["| options | on `--resume` | why |", "|---|---|---|"]
    for term in CONTRACT:
        flags = ", ".join(f"`{shown[name]}`" for name in term.options)
        lines.append(f"| {flags} | {term.rule} | {term.why} |")
    return "\n".join(lines) + "\n"
