"""The uptraining worker: one loop with named phases, run by every process under Accelerate.

    python -m gqa_convert.train   (started by train_setup.launch with the settings in the environment)

Data position is a pure function of the step (data.TokenBlocks), so resuming restores model,
optimizer and RNG through Accelerate and the step and token count from trainer_state.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gqa_convert.checkpointing import (
    latest_checkpoint, prune_checkpoints, save_checkpoint, trim_metrics, write_final_model,
)  # fmt: skip
from gqa_convert.data import TokenBlocks
from gqa_convert.errors import GQAConvertError
from gqa_convert.train_setup import WORKER_ENV, TrainConfig


@dataclass
class TrainerState:
    """The trainer's own resumable state: tiny, in trainer_state.json beside Accelerate's."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all processes


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine from lr to lr x min_lr_ratio at the last step (step counts from 0)."""
    total = config.steps or 1
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.02 * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision != "no" and not cuda:
        raise GQAConvertError(f"--mixed-precision {precision} needs a GPU; use no on CPU")
    log_with = None if config.report_to == "none" else config.report_to
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision, log_with=log_with, project_dir=config.out,
                              gradient_accumulation_steps=config.grad_accum_resolved or 1,
                              step_scheduler_with_optimizer=False)  # fmt: skip
    if config.num_processes and accelerator.num_processes != config.num_processes:
        # accelerate without cpu=True, or a mismatched YAML, silently runs N copies of world 1
        raise GQAConvertError(f"asked for {config.num_processes} processes but Accelerate runs "
                              f"{accelerator.num_processes}: check the launch settings")  # fmt: skip
    return accelerator


def build_model(config: TrainConfig) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)  # fp32 master weights
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.trainable == "attention":
        attention = _attention_modules(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = any(name.startswith(prefix) for prefix in attention)
    return model


def _attention_modules(model: Any) -> list[str]:
    """The attention module of each layer, from the architecture table (q/k/v/o and their norms)."""
    from gqa_convert.architectures import architecture_for

    arch = architecture_for(model.config.to_dict())
    module = arch.kv_tensors[0].suffix.split(".")[0]  # "self_attn" / "self_attention"
    return [arch.layer_prefix.format(layer=i) + module + "." for i in range(model.config.num_hidden_layers)]


def build_teacher(config: TrainConfig, accelerator: Any) -> Any:
    """The frozen teacher, sharded like the student under FSDP/DeepSpeed, else placed on the device."""
    if config.teacher is None:
        return None
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(config.teacher)
    if path.suffix == ".gguf":
        teacher = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                       quantization_config=GgufConfig(dequantize=True))  # fmt: skip
    else:
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        return accelerator.prepare(teacher)
    return teacher.to(accelerator.device)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) per predicted position, averaged (Hinton et al.'s scaling)."""
    student = torch.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def build_optimizer(model: Any, config: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (what the HF Trainer uses); not with sharded (DTensor) parameters
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def micro_batch(blocks: TokenBlocks, config: TrainConfig, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
    """Block indices are laid out step-major, then micro-step, then rank: disjoint across ranks."""
    size = config.micro_batch_size
    per_step = size * world * (config.grad_accum_resolved or 1)
    first = step * per_step + (micro * world + rank) * size
    return torch.from_numpy(np.stack([blocks.block(first + i) for i in range(size)]))


def run_worker(config: TrainConfig) -> None:
    """Set up, resume if asked, train to the step budget, save the final model."""
    # ---- setup ----
    accelerator = build_accelerator(config)
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = build_optimizer(model, config, fused=accelerator.distributed_type.value in ("NO", "MULTI_GPU", "MULTI_CPU"))
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = build_teacher(config, accelerator)
    blocks = TokenBlocks(Path(config.tokens_file), config.seq_len, config.seed)
    eval_ids = _eval_ids(config)
    out = Path(config.out)
    state = TrainerState()
    if config.report_to != "none":
        accelerator.init_trackers("gqa-convert", config={k: v for k, v in vars(config).items() if v is not None})

    # ---- resume ----
    checkpoint = latest_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text()))
        accelerator.print(f"resumed from {checkpoint.name}: step {state.step}, {state.tokens:,} tokens")
    if accelerator.is_main_process:
        trim_metrics(out / "metrics.jsonl", state.step)
    accelerator.wait_for_everyone()

    # ---- train ----
    world, rank, accum = accelerator.num_processes, accelerator.process_index, config.grad_accum_resolved or 1
    step_tokens = config.micro_batch_size * config.seq_len * world * accum
    progress = _Progress(accelerator, config.steps, state.step)
    epoch = blocks.epoch_of(state.step * step_tokens // config.seq_len)
    model.train()
    while state.step < config.steps:
        started = time.perf_counter()
        lr = learning_rate(config, state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, grad_norm = torch.zeros((), device=accelerator.device), None
        distill_sum = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            inputs = micro_batch(blocks, config, state.step, micro, rank, world).to(accelerator.device)
            # Accelerate's own accumulation: no gradient sync, loss scaled by 1/accum, and the optimizer
            # steps only on the last micro-batch (DeepSpeed counts micro-batches itself the same way)
            with accelerator.accumulate(model), accelerator.autocast():
                output = model(input_ids=inputs, labels=inputs)
                loss = output.loss
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=inputs).logits
                    distill = distillation_loss(output.logits, teacher_logits, config.distill_temperature)
                    distill_sum += distill.detach()
                    loss = (1 - config.distill_weight) * loss + config.distill_weight * distill
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += output.loss.detach()  # the LM loss, comparable with or without a teacher
        assert accelerator.sync_gradients, "a step must end on a gradient sync"
        state.step += 1
        state.tokens += step_tokens
        loss_value = accelerator.reduce(loss_sum / accum, "mean").item()
        seconds = time.perf_counter() - started
        record = {"step": state.step, "tokens": state.tokens, "loss": round(loss_value, 6), "lr": lr,
                  "tokens_per_s": round(step_tokens / seconds, 1),
                  "grad_norm": None if grad_norm is None else round(float(grad_norm), 4)}  # fmt: skip
        if teacher is not None:
            record["distill_loss"] = round(accelerator.reduce(distill_sum / accum, "mean").item(), 6)
        new_epoch = blocks.epoch_of(state.step * step_tokens // config.seq_len - 1)
        if new_epoch != epoch:
            accelerator.print(f"data exhausted: starting epoch {new_epoch + 1} (blocks reshuffled, seed {config.seed})")
            epoch = new_epoch
        if eval_ids is not None and config.eval_every and state.step % config.eval_every == 0:
            record.update(_evaluate(model, eval_ids, config, accelerator))
        _log(accelerator, out, record)
        progress.update(state, loss_value)
        # ---- checkpoint ----
        if state.step % config.save_every == 0 and state.step < config.steps:
            save_checkpoint(accelerator, out, state.step, {"step": state.step, "tokens": state.tokens})
            if accelerator.is_main_process:
                prune_checkpoints(out, config.keep_checkpoints)
    progress.close()

    # ---- export ----
    if eval_ids is not None and not (config.eval_every and state.step % config.eval_every == 0):
        accelerator.print(f"final eval: {_evaluate(model, eval_ids, config, accelerator)}")
    write_final_model(accelerator, model, config, state)
    accelerator.end_training()


def _eval_ids(config: TrainConfig) -> torch.Tensor | None:
    if not config.eval_tokens_file:
        return None
    meta = json.loads(Path(config.eval_tokens_file).with_suffix(".json").read_text())
    tokens = np.memmap(config.eval_tokens_file, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64))


def _evaluate(model: Any, ids: torch.Tensor, config: TrainConfig, accelerator: Any) -> dict[str, float]:
    from gqa_convert.evaluate import perplexity_of

    with accelerator.autocast():
        result = perplexity_of(model, ids, config.seq_len, config.micro_batch_size, accelerator)
    return {"eval_perplexity": round(result["perplexity"], 4), "eval_tokens": result["tokens"]}


def _log(accelerator: Any, out: Path, record: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        with open(out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])


class _Progress:
    """A rich bar on the main process: steps, tokens, loss and ETA."""

    def __init__(self, accelerator: Any, total: int, done: int) -> None:
        self.bar = None
        if accelerator.is_main_process:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            # refreshed once per step, not by a background thread that would compete with training
            self.bar = Progress(TextColumn("uptrain"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), auto_refresh=False)  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("uptrain", total=total, completed=done, info="")

    def update(self, state: TrainerState, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.step, info=f"{state.tokens:,} tok  loss {loss:.4f}")
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


if __name__ == "__main__":
    run_worker(TrainConfig.from_json(os.environ[WORKER_ENV]))
