"""What the user sets for an uptraining run: TrainSettings, each option declared once and checked where
it is built (the CLI is generated from it), with the rules that tie options together."""

from __future__ import annotations

from dataclasses import dataclass

from gqa_convert.errors import GQAConvertError
from gqa_convert.options import Options, option
from gqa_convert.planning.hardware import GPU_CHOICES
from gqa_convert.train.strategies import STRATEGY_CHOICES
from gqa_convert.units import parse_size, parse_tokens

PRECISIONS = ("auto", "no", "bf16", "fp16")
TRAINABLE = ("all", "attention")
REPORTERS = ("none", "tensorboard", "wandb")
COMPILE = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True)
class TrainSettings(Options):
    """Everything `gqa-convert uptrain` takes, each option declared once (the CLI is generated from it)."""

    model: str = option(help="a transformers folder (e.g. the output of pool)", argument=True)
    out: str = option(help="output folder: final model, metrics.jsonl, checkpoints/", flags=("--out", "-o"))
    data: str = option(
        help="a token folder (gqa-convert tokenize), a text file (any name; UTF-8), a .jsonl/.json/.parquet/.csv/"
        ".arrow table, a folder of them, or a Hub dataset id"
    )
    tokens: int | None = option(
        None, help="token budget, e.g. 50M or 2B (overrides --fraction)", parse=parse_tokens, min=1, metavar="N"
    )
    fraction: float = option(0.05, help="budget as a fraction of the original pre-training tokens", above=0, max=1)
    original_tokens: int | None = option(
        None, help="the original pre-training tokens, e.g. 2T", parse=parse_tokens, min=1, metavar="N"
    )
    text_column: str = option("text", help="text column of table data")
    data_config: str | None = option(None, help="Hub dataset configuration")
    split: str = option("train", help="Hub dataset split")
    seq_len: int = option(2048, help="tokens per packed block", min=2)
    micro_batch_size: int = option(4, help="blocks per process per forward", min=1)
    grad_accum: int = option(1, help="micro-batches per optimizer step", min=1)
    global_batch_tokens: int | None = option(
        None, help="tokens per optimizer step (sets --grad-accum)", parse=parse_tokens, min=1, metavar="N"
    )
    lr: float = option(5e-5, help="peak learning rate", above=0)
    min_lr_ratio: float = option(0.1, help="final learning rate as a fraction of --lr (cosine)", min=0, max=1)
    warmup_steps: int | None = option(None, help="linear warmup steps (default 2% of the steps)", min=0)
    weight_decay: float = option(0.1, help="AdamW weight decay (not on biases and norms)", min=0)
    grad_clip: float = option(1.0, help="gradient norm clip (0: off)", min=0)
    mixed_precision: str = option(
        "auto", help="auto (bf16 on GPUs that have it, else no), no, bf16, fp16", choices=PRECISIONS
    )
    gradient_checkpointing: bool = option(False, help="trade compute for memory", flags=("--gradient-checkpointing",))
    compile: str = option(
        "auto",
        help="torch.compile each decoder block (regional: one compilation shared by all blocks): auto is on with "
        "CUDA GPUs and off on CPU, where compiling first costs ~30 s (2 cores, a 20M-parameter Llama) and saves "
        "~10% of a step, a loss on short runs; on, off (not under deepspeed)",
        choices=COMPILE,
    )
    trainable: str = option("all", help="all, or attention (q/k/v/o only: less optimizer memory)", choices=TRAINABLE)
    seed: int = option(0, help="data order seed", min=0)
    save_every: int = option(500, help="optimizer steps between checkpoints", min=1)
    keep_checkpoints: int = option(2, help="checkpoints kept", min=1)
    resume: bool = option(False, help="continue from the latest checkpoint of the run in OUT")
    force: bool = option(False, help="replace a non-empty OUT that this tool wrote")
    trust_deepspeed_checkpoint: bool = option(
        False,
        help="let --resume load a DeepSpeed checkpoint: its files are pickles, which run code when loaded "
        "(only a checkpoint you wrote, on storage no one else can write)",
        flags=("--trust-deepspeed-checkpoint",),
    )
    report_to: str = option("none", help="none, tensorboard or wandb", choices=REPORTERS)
    eval_data: str | None = option(None, help="held-out text (or token folder) for perplexity during training")
    eval_every: int = option(0, help="steps between evaluations (0: at the end only)", min=0)
    eval_tokens: int = option(65536, help="tokens of --eval-data used", parse=parse_tokens, min=2)
    num_processes: int | None = option(None, help="processes over all machines (default: every GPU)", min=1)
    num_machines: int = option(1, help="machines", min=1)
    machine_rank: int = option(
        0, help="this machine's rank (machines of --num-machines are numbered by the rendezvous)", min=0
    )
    main_process_ip: str | None = option(None, help="address of machine rank 0")
    main_process_port: int | None = option(
        None, help="port on machine rank 0 (default: the YAML's, or 29500)", min=1, max=65535
    )
    accelerate_config: str | None = option(
        None, help="an Accelerate YAML: processes and machines, and FSDP (version 2) or DeepSpeed ZeRO-3"
    )
    strategy: str = option(
        "auto",
        help="auto (the YAML's sharding, else ddp), ddp, fsdp2 (sharded, CPU or GPU) or deepspeed (ZeRO-3, GPU)",
        choices=STRATEGY_CHOICES,
    )
    dry_run: bool = option(
        False, help="plan the run from the model's config alone: memory per GPU, whether it fits, time; train nothing"
    )
    measure: bool = option(False, help="with --dry-run: also load the model and time one step on this machine")
    gpu: str = option("auto", help="the GPU to plan for (default: the one detected)", choices=GPU_CHOICES)
    gpu_memory: int | None = option(
        None, help="memory per GPU to plan for, e.g. 80GB or 80GiB", parse=parse_size, min=1, metavar="SIZE"
    )
    tokens_per_second: float | None = option(
        None, help="training tokens/s per GPU, for the plan's time (default: estimated from FLOPs)", above=0
    )
    mfu: float = option(0.35, help="model FLOPs utilisation the plan's time estimate assumes", above=0, max=1)
    source_perplexity: float | None = option(
        None,
        help="the source model's held-out perplexity, a reference line of recovery.png (default: the teacher's)",
        above=0,
    )
    timeout_minutes: float = option(
        60.0, help="how long a process waits for the others: rank 0's tokenization, rendezvous, collectives", above=0
    )
    teacher: str | None = option(None, help="distil from this model (folder or .gguf): the unconverted source")
    distill_weight: float = option(0.5, help="weight of the distillation loss (the LM loss gets 1 - w)", above=0, max=1)
    distill_temperature: float = option(1.0, help="softmax temperature of the distillation", above=0)

    def check(self) -> None:
        """Rules between options (each option's own type and range are checked from its declaration)."""
        if self.num_machines > 1 and not self.main_process_ip:
            raise GQAConvertError("--num-machines > 1 needs --main-process-ip (the address of machine rank 0)")
        if self.machine_rank >= self.num_machines and self.num_machines > 1:
            raise GQAConvertError(
                f"--machine-rank {self.machine_rank} must be below --num-machines {self.num_machines}"
            )
        if self.eval_every and not self.eval_data:
            raise GQAConvertError("--eval-every needs --eval-data")
        if self.resume and self.force:
            raise GQAConvertError("--resume continues the run in OUT and --force replaces it: pass one of them")
        if self.trust_deepspeed_checkpoint and not self.resume:
            raise GQAConvertError("--trust-deepspeed-checkpoint applies to --resume only: drop it")
        if self.measure and not self.dry_run:
            raise GQAConvertError("--measure times one step of a --dry-run: add --dry-run")
        if self.source_perplexity is not None and not self.eval_data:
            raise GQAConvertError("--source-perplexity is drawn beside the held-out perplexity: add --eval-data")
