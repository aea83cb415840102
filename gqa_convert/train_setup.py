"""Everything before the first training step: the run's settings, their validation, data preparation
and the launch of the worker processes under Accelerate.

Data is tokenized once, before any worker starts (nanoGPT's prepare step), so a bad data file fails
in one process with one message and nothing is written to OUT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_convert.budget import resolve_budget
from gqa_convert.checkpoint import check_model_folder
from gqa_convert.errors import GQAConvertError

WORKER_ENV = "GQA_CONVERT_WORKER_CONFIG"


@dataclass
class TrainConfig:
    model: str
    out: str
    data: str
    tokens: str | None = None
    fraction: float = 0.05
    original_tokens: str | None = None
    text_column: str = "text"
    data_config: str | None = None
    split: str = "train"
    seq_len: int = 2048
    micro_batch_size: int = 4
    grad_accum: int = 1
    global_batch_tokens: int | None = None
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 2% of the steps, at least 1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    trainable: str = "all"
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    force: bool = False
    report_to: str = "none"
    eval_data: str | None = None
    eval_every: int = 0
    eval_tokens: int = 65536
    num_processes: int | None = None  # default: every visible GPU, or 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500
    accelerate_config: str | None = None
    dry_run: bool = False
    teacher: str | None = None  # distil from this model's logits (the unconverted source)
    distill_weight: float = 0.5  # loss = (1 - w) LM + w T^2 KL(teacher || student)
    distill_temperature: float = 1.0
    # set by prepare(): what the workers read
    tokens_file: str | None = None
    eval_tokens_file: str | None = None
    grad_accum_resolved: int | None = None
    steps: int | None = None
    budget_origin: str | None = None

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def default_num_processes() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def world_size(config: TrainConfig) -> int:
    if config.num_processes is not None:
        return config.num_processes
    if config.accelerate_config:
        import yaml

        return int(yaml.safe_load(Path(config.accelerate_config).read_text()).get("num_processes", 1))
    return default_num_processes() * config.num_machines


def validate(config: TrainConfig) -> None:
    """Every check that needs no data: the CLI and the library both go through here."""
    model = Path(config.model)
    model_config = check_model_folder(model)
    positions = getattr(model_config, "max_position_embeddings", None)
    if config.seq_len < 2:
        raise GQAConvertError("--seq-len must be at least 2")
    if positions is not None and config.seq_len > positions:
        raise GQAConvertError(f"--seq-len {config.seq_len} is above the model's {positions} positions: lower it")
    for name in ("micro_batch_size", "grad_accum", "save_every", "keep_checkpoints", "num_machines"):
        if getattr(config, name) < 1:
            raise GQAConvertError(f"--{name.replace('_', '-')} must be at least 1")
    if config.trainable not in ("all", "attention"):
        raise GQAConvertError("--trainable must be all or attention")
    if config.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise GQAConvertError("--mixed-precision must be auto, no, bf16 or fp16")
    if config.mixed_precision in ("bf16", "fp16"):
        import torch

        if not torch.cuda.is_available():
            raise GQAConvertError(f"--mixed-precision {config.mixed_precision} needs a GPU; use no on CPU")
    if config.report_to not in ("none", "tensorboard", "wandb"):
        raise GQAConvertError("--report-to must be none, tensorboard or wandb")
    if config.report_to != "none":
        import importlib.util

        if importlib.util.find_spec(config.report_to) is None:
            raise GQAConvertError(f"--report-to {config.report_to} needs its package: "
                                  f"pip install 'gqa-convert[{config.report_to}]'")  # fmt: skip
    if config.accelerate_config and not Path(config.accelerate_config).is_file():
        raise GQAConvertError(f"accelerate config not found: {config.accelerate_config}")
    if config.num_machines > 1 and not config.main_process_ip:
        raise GQAConvertError("--num-machines > 1 needs --main-process-ip (the address of machine rank 0)")
    if config.teacher is not None:
        _check_teacher(config, model_config)
    from gqa_convert.data import check_data

    check_data(config.data)
    if config.eval_data:
        check_data(config.eval_data)
    if config.eval_every and not config.eval_data:
        raise GQAConvertError("--eval-every needs --eval-data")
    out = Path(config.out).resolve()
    if out == model.resolve() or model.resolve() in out.parents:
        raise GQAConvertError(f"output {out} is inside the model folder: choose a folder outside it")
    if out.is_dir() and any(out.iterdir()) and not (config.resume or config.force):
        raise GQAConvertError(f"output folder {out} is not empty: pass --resume to continue it or --force to replace it")
    if out.exists() and not out.is_dir():
        raise GQAConvertError(f"output {out} exists and is a file: choose a folder path")


def _check_teacher(config: TrainConfig, model_config: Any) -> None:
    teacher = Path(config.teacher)
    if teacher.suffix == ".gguf" and teacher.is_file():
        from transformers import AutoConfig

        teacher_config = AutoConfig.from_pretrained(teacher.parent, gguf_file=teacher.name)
    else:
        check_model_folder(teacher)
        from transformers import AutoConfig

        teacher_config = AutoConfig.from_pretrained(teacher)
    if teacher_config.vocab_size != model_config.vocab_size:
        raise GQAConvertError(f"the teacher's vocabulary ({teacher_config.vocab_size}) differs from the model's "
                              f"({model_config.vocab_size}): distil from the model it was converted from")  # fmt: skip
    if not 0 < config.distill_weight <= 1 or config.distill_temperature <= 0:
        raise GQAConvertError("--distill-weight must be in (0, 1] and --distill-temperature positive")


def resolve_batch(config: TrainConfig, world: int) -> int:
    """Gradient accumulation steps, from --grad-accum or --global-batch-tokens."""
    per_micro_step = config.micro_batch_size * world * config.seq_len
    if config.global_batch_tokens is None:
        return config.grad_accum
    if config.global_batch_tokens % per_micro_step:
        raise GQAConvertError(
            f"--global-batch-tokens {config.global_batch_tokens} is not a multiple of micro batch x processes "
            f"x seq len = {per_micro_step}"
        )
    return config.global_batch_tokens // per_micro_step


def _tokenize(data: str, config: TrainConfig, tokenizer: Any, reuse: Path | None, staging: Path, name: str,
              max_tokens: int | None) -> str:  # fmt: skip
    """The file name of `data` tokenized; made in `staging` unless `reuse` (OUT/data) already has it."""
    from gqa_convert.data import data_fingerprint, iter_documents, tokenize_to_file

    file_name = f"{name}-{data_fingerprint(data, tokenizer, config.text_column, str(max_tokens))}.tokens"
    if reuse is not None and (reuse / file_name).exists():
        return file_name
    from rich.progress import Progress, SpinnerColumn, TextColumn

    documents = iter_documents(data, config.text_column, config.data_config, config.split)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,} tokens"),
                  transient=True) as progress:  # fmt: skip
        task = progress.add_task(f"tokenizing {data}", total=max_tokens)
        count = tokenize_to_file(documents, tokenizer, staging / file_name, max_tokens,
                                 on_tokens=lambda n: progress.advance(task, n))  # fmt: skip
    if count < config.seq_len:
        raise GQAConvertError(f"{data} holds {count} tokens, fewer than one block of --seq-len {config.seq_len}: "
                              "give more text or lower --seq-len")  # fmt: skip
    return file_name


def prepare(config: TrainConfig) -> TrainConfig:
    """Validate, size the run and tokenize the data into OUT/data. The data is tokenized beside OUT
    and moved in only when every check passed: bad input leaves OUT as it was. A dry run leaves
    nothing behind but its tokens in a temporary folder that the caller removes (`dry_run_dir`)."""
    validate(config)
    if "LOCAL_RANK" in os.environ and not os.environ.get(WORKER_ENV):
        raise GQAConvertError("run `gqa-convert uptrain` directly, not under accelerate launch or torchrun: "
                              "it launches Accelerate itself (pass your YAML with --accelerate-config)")  # fmt: skip
    world = world_size(config)
    accum = resolve_batch(config, world)
    budget = resolve_budget(Path(config.model), config.tokens, config.fraction, config.original_tokens,
                            config.micro_batch_size * accum * world * config.seq_len)  # fmt: skip
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except (OSError, ValueError) as error:
        raise GQAConvertError(f"{config.model} has no usable tokenizer ({error}): save one with the model") from None
    out = Path(config.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    reuse = None if config.force and not config.resume else out / "data"  # --force starts afresh
    need = (budget.global_batch_tokens if config.dry_run else budget.tokens) + config.seq_len
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.data-", dir=out.parent))
    try:
        train_name = _tokenize(config.data, config, tokenizer, reuse, staging, "train", need)
        eval_name = None
        if config.eval_data:
            eval_name = _tokenize(config.eval_data, config, tokenizer, reuse, staging, "eval", config.eval_tokens)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if config.dry_run:
        data_dir = staging
    else:
        if config.force and not config.resume and out.exists():
            shutil.rmtree(out)
        data_dir = out / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        for file in staging.iterdir():
            shutil.move(str(file), data_dir / file.name)
        shutil.rmtree(staging)
    return dataclasses.replace(
        config, tokens_file=str(data_dir / train_name),
        eval_tokens_file=str(data_dir / eval_name) if eval_name else None,
        grad_accum_resolved=accum, steps=budget.steps, budget_origin=budget.origin, num_processes=world,
    )  # fmt: skip


def launch_command(config: TrainConfig) -> list[str] | None:
    """The `accelerate launch` command for several processes, or None to run in this process."""
    if os.environ.get(WORKER_ENV) or "LOCAL_RANK" in os.environ:
        return None  # already a worker (or launched by the user with accelerate/torchrun)
    world = world_size(config)
    if world == 1 and config.num_machines == 1 and not config.accelerate_config:
        return None
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config.accelerate_config:
        command += ["--config_file", config.accelerate_config]
        if config.num_processes is not None:
            command += ["--num_processes", str(config.num_processes)]
        if config.machine_rank:  # one YAML for every node: the rank comes from the command line
            command += ["--machine_rank", str(config.machine_rank)]
    else:
        command += ["--multi_gpu", "--num_processes", str(world), "--dynamo_backend", "no",
                    "--mixed_precision", _launcher_precision(config.mixed_precision)]  # fmt: skip
    if config.num_machines == 1 and not config.accelerate_config:
        command += ["--num_machines", "1"]
    if config.num_machines > 1:
        command += ["--num_machines", str(config.num_machines), "--machine_rank", str(config.machine_rank),
                    "--main_process_ip", str(config.main_process_ip),
                    "--main_process_port", str(config.main_process_port), "--rdzv_backend", "c10d"]  # fmt: skip
    return command + ["-m", "gqa_convert.train"]


def _launcher_precision(setting: str) -> str:
    """What the worker will pick, told to the launcher too (it warns when not told)."""
    if setting != "auto":
        return setting
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def launch(config: TrainConfig) -> int:
    """Run the workers: here for one process, else under `accelerate launch` (exit code returned)."""
    command = launch_command(config)
    if command is None:
        from gqa_convert.train import run_worker

        run_worker(config)
        return 0
    env = {**os.environ, WORKER_ENV: config.to_json()}
    return subprocess.run(command, env=env).returncode


def dry_run_plan(config: TrainConfig) -> dict[str, Any]:
    """The run's size, and its duration estimated from one measured step on this machine's device."""
    import time

    import torch

    from gqa_convert.data import TokenBlocks
    from gqa_convert.train import build_model, build_optimizer, micro_batch

    world, accum = config.num_processes or 1, config.grad_accum_resolved or 1
    global_batch = config.micro_batch_size * accum * world * config.seq_len
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(config).to(device)
    optimizer = build_optimizer(model, config)
    blocks = TokenBlocks(Path(config.tokens_file), config.seq_len, config.seed)
    timings = []
    for _ in range(2):  # the first step pays for warm-up; the second is the one that counts
        started = time.perf_counter()
        for micro in range(accum):
            inputs = micro_batch(blocks, config, 0, micro, 0, world).to(device)
            model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.zero_grad(set_to_none=True)  # measured, not applied
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    step_seconds = timings[-1]
    return {
        "budget": config.budget_origin,
        "tokens": (config.steps or 0) * global_batch,
        "steps": config.steps,
        "global_batch_tokens": global_batch,
        "micro_batch_size": config.micro_batch_size,
        "grad_accum": accum,
        "processes": world,
        "seq_len": config.seq_len,
        "device": device,
        "measured_step_s": round(step_seconds, 3),
        "estimated_hours": round((config.steps or 0) * step_seconds / 3600, 3),
    }


def uptrain(config: TrainConfig) -> dict[str, Any]:
    """Library entry point: prepare, then train (or only plan, with dry_run). Returns the plan, or
    the final step, tokens and loss read back from OUT."""
    resolved = prepare(config)
    if config.dry_run:
        try:
            return dry_run_plan(resolved)
        finally:
            shutil.rmtree(Path(resolved.tokens_file or "").parent, ignore_errors=True)
    code = launch(resolved)
    if code != 0:
        raise GQAConvertError(f"training stopped with exit code {code}; rerun with --resume to continue "
                              "from the last checkpoint")  # fmt: skip
    out = Path(config.out)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"out": str(out), "steps": last["step"], "tokens": last["tokens"], "final_loss": last["loss"]}
