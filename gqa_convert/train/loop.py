"""The uptraining worker: one loop with named phases, run by every process under Accelerate.

    python -m gqa_convert.train.loop   (started by train.launch with the plan in the environment)

Data position is a pure function of the step (data.tokens.TokenBlocks), so resuming restores model,
optimizer and RNG through Accelerate and the step and token count from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gqa_convert.data.tokens import TokenBlocks, read_head
from gqa_convert.evaluate import perplexity_of
from gqa_convert.train.checkpoints import (
    append_metrics,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    trim_metrics,
)
from gqa_convert.train.components import (
    UNSHARDED,
    build_accelerator,
    build_model,
    build_optimizer,
    build_teacher,
    distillation_loss,
    micro_batch,
    open_blocks,
)
from gqa_convert.train.export import write_final_model
from gqa_convert.train.prepare import WORKER_ENV
from gqa_convert.train.progress import TrainProgress
from gqa_convert.train.schedule import learning_rate
from gqa_convert.train.settings import TrainPlan


@dataclass
class TrainerState:
    """The trainer's own resumable state: tiny, saved beside Accelerate's in each checkpoint."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all processes

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class Worker:
    """What the loop works with, built once in the setup phase."""

    plan: TrainPlan
    accelerator: Any
    model: Any
    optimizer: Any
    teacher: Any
    blocks: TokenBlocks
    eval_ids: torch.Tensor | None


def setup(plan: TrainPlan) -> Worker:
    accelerator = build_accelerator(plan)
    torch.manual_seed(plan.settings.seed)
    model = build_model(plan.settings)
    optimizer = build_optimizer(model, plan.settings, fused=accelerator.distributed_type.value in UNSHARDED)
    model, optimizer = accelerator.prepare(model, optimizer)
    teacher = build_teacher(plan.settings, accelerator)
    eval_ids = None
    if plan.eval_tokens:
        eval_ids = torch.from_numpy(read_head(plan.eval_tokens, plan.settings.eval_tokens))
    if plan.settings.report_to != "none":
        tracked = {k: v for k, v in vars(plan.settings).items() if v is not None}
        accelerator.init_trackers("gqa-convert", config=tracked)
    return Worker(plan, accelerator, model, optimizer, teacher, open_blocks(plan), eval_ids)


def resume(worker: Worker) -> TrainerState:
    """The latest complete checkpoint when --resume is given; the metrics log trimmed to it."""
    out, accelerator = Path(worker.plan.settings.out), worker.accelerator
    state = TrainerState()
    checkpoint = latest_checkpoint(out) if worker.plan.settings.resume else None
    if checkpoint is not None:
        state = TrainerState(**load_checkpoint(accelerator, checkpoint))
        accelerator.print(f"resumed from {checkpoint.name}: step {state.step}, {state.tokens:,} tokens")
    if accelerator.is_main_process:
        trim_metrics(out / "metrics.jsonl", state.step)
    accelerator.wait_for_everyone()
    return state


def train_step(worker: Worker, step: int) -> dict[str, Any]:
    """One optimizer step over grad_accum micro-batches; returns the step's metrics record."""
    plan, accelerator, model, optimizer = worker.plan, worker.accelerator, worker.model, worker.optimizer
    settings = plan.settings
    started = time.perf_counter()
    lr = learning_rate(step, plan.steps, settings.lr, settings.min_lr_ratio, settings.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=accelerator.device)
    distill_sum = torch.zeros((), device=accelerator.device)
    grad_norm = None
    for micro in range(plan.grad_accum):
        inputs = micro_batch(worker.blocks, plan, step, micro, accelerator.process_index).to(accelerator.device)
        # Accelerate's own accumulation: no gradient sync, loss scaled by 1/accum, and the optimizer
        # steps only on the last micro-batch (DeepSpeed counts micro-batches itself the same way)
        with accelerator.accumulate(model), accelerator.autocast():
            output = model(input_ids=inputs, labels=inputs)
            loss = output.loss
            if worker.teacher is not None:
                with torch.no_grad():
                    teacher_logits = worker.teacher(input_ids=inputs).logits
                distill = distillation_loss(output.logits, teacher_logits, settings.distill_temperature)
                distill_sum += distill.detach()
                loss = (1 - settings.distill_weight) * loss + settings.distill_weight * distill
            accelerator.backward(loss)
            if accelerator.sync_gradients and settings.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += output.loss.detach()  # the LM loss, comparable with or without a teacher
    assert accelerator.sync_gradients, "a step must end on a gradient sync"
    seconds = time.perf_counter() - started
    record = {
        "step": step + 1,
        "tokens": (step + 1) * plan.step_tokens,
        "loss": round(accelerator.reduce(loss_sum / plan.grad_accum, "mean").item(), 6),
        "lr": lr,
        "tokens_per_s": round(plan.step_tokens / seconds, 1),
        "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
    }
    if worker.teacher is not None:
        record["distill_loss"] = round(accelerator.reduce(distill_sum / plan.grad_accum, "mean").item(), 6)
    return record


def evaluate_now(worker: Worker) -> dict[str, float]:
    settings = worker.plan.settings
    with worker.accelerator.autocast():
        result = perplexity_of(
            worker.model, worker.eval_ids, settings.seq_len, settings.micro_batch_size, worker.accelerator
        )
    return {"eval_perplexity": round(result["perplexity"], 4), "eval_tokens": result["tokens"]}


def log(worker: Worker, record: dict[str, Any]) -> None:
    accelerator = worker.accelerator
    if accelerator.is_main_process:
        append_metrics(Path(worker.plan.settings.out) / "metrics.jsonl", record)
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])


def run_worker(plan: TrainPlan) -> None:
    """Set up, resume if asked, train to the step budget, save the final model."""
    settings = plan.settings
    # ---- setup ----
    worker = setup(plan)
    accelerator, out = worker.accelerator, Path(settings.out)
    # ---- resume ----
    state = resume(worker)
    # ---- train ----
    progress = TrainProgress(accelerator, plan.steps, state.step)
    epoch = worker.blocks.epoch_of(state.tokens // settings.seq_len)
    worker.model.train()
    while state.step < plan.steps:
        record = train_step(worker, state.step)
        state.step, state.tokens = record["step"], record["tokens"]
        new_epoch = worker.blocks.epoch_of(state.tokens // settings.seq_len - 1)
        if new_epoch != epoch:
            accelerator.print(
                f"data exhausted: starting epoch {new_epoch + 1} (blocks reshuffled, seed {settings.seed})"
            )
            epoch = new_epoch
        if worker.eval_ids is not None and settings.eval_every and state.step % settings.eval_every == 0:
            record.update(evaluate_now(worker))
        log(worker, record)
        progress.update(state.step, state.tokens, record["loss"])
        # ---- checkpoint ----
        if state.step % settings.save_every == 0 and state.step < plan.steps:
            save_checkpoint(accelerator, out, state.step, state.state_dict())
            if accelerator.is_main_process:
                prune_checkpoints(out, settings.keep_checkpoints)
    progress.close()
    # ---- export ----
    if worker.eval_ids is not None and not (settings.eval_every and state.step % settings.eval_every == 0):
        accelerator.print(f"final eval: {evaluate_now(worker)}")
    write_final_model(accelerator, worker.model, plan, state.step, state.tokens)
    accelerator.end_training()


if __name__ == "__main__":
    run_worker(TrainPlan.from_json(os.environ[WORKER_ENV]))
