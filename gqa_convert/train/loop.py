"""The uptraining worker: one loop with named phases, run by every process, whatever the strategy.

    python -m gqa_convert.train.loop   (started by train.launch with the plan in the environment)

The data position is a pure function of the step (data.tokens.TokenBlocks), so resuming restores the
strategy's state (model, optimizer), RNG, and the step and token count from the checkpoint. A final
checkpoint is saved before the export: a failed export is redone by --resume, without training.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gqa_convert.data.tokens import TokenBlocks, read_head
from gqa_convert.errors import GQAConvertError, is_disk_full
from gqa_convert.evaluation import perplexity_of
from gqa_convert.train.checkpoints import (
    TrainerState,
    append_metrics,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    trim_metrics,
)
from gqa_convert.train.components import micro_batch, open_blocks
from gqa_convert.train.deepspeed_zero3 import DeepSpeedZero3
from gqa_convert.train.export import export_model
from gqa_convert.train.losses import Weights
from gqa_convert.train.parallel import DataParallel, FullyShard
from gqa_convert.train.prepare import WORKER_ENV
from gqa_convert.train.progress import TrainProgress
from gqa_convert.train.runtime import (
    Runtime,
    check_shared_out,
    die_with_parent,
    follow_owner,
    report_error,
    start,
    stop,
)
from gqa_convert.train.schedule import learning_rate
from gqa_convert.train.settings import TrainPlan

# how torch.save's zip writer reports a write the filesystem refused (it loses the errno)
_WRITER_FAILURES = ("PytorchStreamWriter failed", "unexpected pos")
STRATEGIES = {"ddp": DataParallel, "fsdp2": FullyShard, "deepspeed": DeepSpeedZero3}


@dataclass
class Worker:
    """What the loop works with, built once in the setup phase."""

    plan: TrainPlan
    runtime: Runtime
    strategy: DataParallel
    blocks: TokenBlocks
    eval_ids: torch.Tensor | None

    @property
    def out(self) -> Path:
        return Path(self.plan.settings.out)


def setup(plan: TrainPlan, runtime: Runtime) -> Worker:
    check_shared_out(runtime, Path(plan.settings.out))
    torch.manual_seed(plan.settings.seed)
    strategy = STRATEGIES[plan.strategy](runtime, plan)
    eval_ids = None
    if plan.eval_tokens:
        eval_ids = torch.from_numpy(read_head(plan.eval_tokens, plan.settings.eval_tokens))
    if plan.settings.report_to != "none":
        tracked = {k: v for k, v in vars(plan.settings).items() if v is not None}
        runtime.accelerator.init_trackers("gqa-convert", config=tracked)
    return Worker(plan, runtime, strategy, open_blocks(plan), eval_ids)


def resume(worker: Worker) -> TrainerState:
    """The checkpoint the launcher chose (plan.resume_from); the metrics log trimmed to it."""
    state, folder = TrainerState(), worker.plan.resume_from
    if folder is not None:
        state = load_checkpoint(worker.strategy, Path(folder), worker.runtime.world)
        worker.runtime.accelerator.print(
            f"resumed from {Path(folder).name}: step {state.step}, {state.tokens:,} tokens"
        )
    if worker.runtime.is_main:
        trim_metrics(worker.out / "metrics.jsonl", state.step)
    torch.distributed.barrier()
    return state


def train_step(worker: Worker, step: int) -> dict[str, Any]:
    """One optimizer step over grad_accum micro-batches; returns the step's metrics record."""
    plan, runtime, strategy = worker.plan, worker.runtime, worker.strategy
    settings = plan.settings
    started = time.perf_counter()
    lr = learning_rate(step, plan.steps, settings.lr, settings.min_lr_ratio, settings.warmup_steps)
    strategy.set_lr(lr)
    teacher = strategy.teacher
    weights = Weights(1 - settings.distill_weight, settings.distill_weight, settings.distill_temperature)
    if teacher is None:
        weights = Weights()
    lm_sum = torch.zeros((), device=runtime.device)
    kd_sum = torch.zeros((), device=runtime.device)
    for micro in range(plan.grad_accum):
        inputs = micro_batch(worker.blocks, plan, step, micro, runtime.rank).to(runtime.device)
        with strategy.micro_step(last=micro == plan.grad_accum - 1):
            teacher_hidden = None
            if teacher is not None:
                with torch.no_grad(), strategy.autocast():
                    teacher_hidden = teacher(inputs)
            with _teacher_head(strategy) as teacher_head, strategy.autocast():
                parts = strategy.model(
                    inputs, labels=inputs, teacher_hidden=teacher_hidden, teacher_head=teacher_head, weights=weights
                )
            strategy.backward(parts.loss)
        lm_sum += parts.lm
        kd_sum += parts.kd
    grad_norm = strategy.step()
    seconds = time.perf_counter() - started
    reduce = runtime.accelerator.reduce
    record = {
        "step": step + 1,
        "tokens": (step + 1) * plan.step_tokens,
        "loss": round(reduce(lm_sum / plan.grad_accum, "mean").item(), 6),  # the LM loss, with or without a teacher
        "lr": lr,
        "tokens_per_s": round(plan.step_tokens / seconds, 1),
        "grad_norm": None if grad_norm is None else round(grad_norm, 4),
    }
    if teacher is not None:
        record["distill_loss"] = round(reduce(kd_sum / plan.grad_accum, "mean").item(), 6)
    return record


@contextlib.contextmanager
def _teacher_head(strategy: DataParallel) -> Iterator[Any]:
    if strategy.teacher is None:
        yield None
    else:
        with strategy.teacher_head() as head:
            yield head


def evaluate_now(worker: Worker) -> dict[str, float]:
    settings, strategy = worker.plan.settings, worker.strategy
    with strategy.autocast():
        result = perplexity_of(
            strategy.model, worker.eval_ids, settings.seq_len, settings.micro_batch_size, worker.runtime.accelerator
        )
    strategy.after_eval()
    return {"eval_perplexity": round(result["perplexity"], 4), "eval_tokens": result["tokens"]}


def log(worker: Worker, record: dict[str, Any]) -> None:
    accelerator = worker.runtime.accelerator
    if worker.runtime.is_main:
        append_metrics(worker.out / "metrics.jsonl", record)
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])


def report_shares(worker: Worker) -> None:
    """Which part of the model and optimizer state each process holds (every rank calls it)."""
    shares = [None] * worker.runtime.world
    torch.distributed.all_gather_object(shares, worker.strategy.shares())
    if worker.runtime.is_main:
        for rank, share in enumerate(shares):
            held = ", ".join(f"{name} {local:,}/{total:,}" for name, (local, total) in share.items())
            print(f"{worker.plan.strategy} rank {rank}/{worker.runtime.world} holds {held}", flush=True)


@contextlib.contextmanager
def writing(what: str, kept: str, rerun: str = "rerun with --resume") -> Iterator[None]:
    """A full disk or a refused write becomes one line: what was not written, what is kept, the fix."""
    try:
        yield
    except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        cause = output_error(error)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        where = f": {cause.filename}" if cause.filename else ""
        action = "free space" if is_disk_full(cause) else "check the space and permissions of OUT"
        if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            action = "make OUT writable"
        raise GQAConvertError(f"{what} was not written ({reason}{where}); {kept}: {action} and {rerun}") from None


def output_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`, also inside torch.distributed.checkpoint's per-rank failures."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, GQAConvertError):
            return None  # already one line
        if isinstance(error, OSError):
            return error
        if isinstance(error, RuntimeError) and any(sign in str(error) for sign in _WRITER_FAILURES):
            return OSError(None, "a write failed")
        failures = getattr(error, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for failure in failures.values():
                found = output_error(failure[0] if isinstance(failure, tuple) else failure)
                if found is not None:
                    return found
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def train(worker: Worker, state: TrainerState) -> int:
    """Train to the step budget; returns the step of the last checkpoint saved or resumed."""
    settings, runtime = worker.plan.settings, worker.runtime
    saved = first = state.step
    progress = TrainProgress(runtime.accelerator, worker.plan.steps, state.step)
    epoch = worker.blocks.epoch_of(state.tokens // settings.seq_len)
    worker.strategy.model.train()
    while state.step < worker.plan.steps:
        record = train_step(worker, state.step)
        state.step, state.tokens = record["step"], record["tokens"]
        if state.step == first + 1:
            report_shares(worker)
        new_epoch = worker.blocks.epoch_of(state.tokens // settings.seq_len - 1)
        if new_epoch != epoch:
            runtime.accelerator.print(
                f"data exhausted: starting epoch {new_epoch + 1} (blocks reshuffled, seed {settings.seed})"
            )
            epoch = new_epoch
        if worker.eval_ids is not None and settings.eval_every and state.step % settings.eval_every == 0:
            record.update(evaluate_now(worker))
        with writing("metrics.jsonl", f"the checkpoint of step {saved} is kept" if saved else "no checkpoint is kept"):
            log(worker, record)
        progress.update(state.step, state.tokens, record["loss"])
        if state.step % settings.save_every == 0 or state.step == worker.plan.steps:
            checkpoint(worker, state, saved)
            saved = state.step
    progress.close()
    return saved


def checkpoint(worker: Worker, state: TrainerState, previous: int) -> None:
    kept = f"the checkpoint of step {previous} is kept" if previous else "no checkpoint is kept"
    with writing(f"checkpoint step-{state.step:08d}", kept):
        save_checkpoint(worker.strategy, worker.out, state, worker.plan)
        if worker.runtime.is_main:
            prune_checkpoints(worker.out, worker.plan.settings.keep_checkpoints)


def run_worker(plan: TrainPlan) -> None:
    """Set up, resume if asked, train to the step budget, save the final model."""
    runtime = start(plan)
    try:
        with writing("a file in OUT", "the last checkpoint is kept"):
            worker = setup(plan, runtime)
            state = resume(worker)
            saved = train(worker, state)
        settings = plan.settings
        if worker.eval_ids is not None and not (settings.eval_every and state.step % settings.eval_every == 0):
            runtime.accelerator.print(f"final eval: {evaluate_now(worker)}")
        with writing("the final model", f"the checkpoint of step {saved} is kept", "rerun with --resume to export it"):
            export_model(worker.strategy, plan, state.step, state.tokens)
    finally:
        stop(runtime)


def main() -> int:
    """Entry point of a launched worker: a user error goes to the launching process as one line."""
    die_with_parent()
    follow_owner()
    try:
        run_worker(TrainPlan.from_json(os.environ[WORKER_ENV]))
    except GQAConvertError as error:
        report_error(str(error))
        return 2
    finally:
        # free the sharded modules and their process-group references now: left to the interpreter's
        # final collection, gloo's worker threads may abort the process after a successful run
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
