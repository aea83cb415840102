"""The uptraining worker: one loop with named phases, run by every process, whatever the strategy.

    python -m gqa_convert.train.loop   (started by train.launch with the plan in the environment)

    run_worker: start -> Trainer (build the strategy, the batches, the metrics log) -> resume -> train
                -> final evaluation -> export
    train:      train_step per optimizer step, then evaluate, log and checkpoint as due
    train_step: the learning rate, forward_backward per micro-batch, the optimizer step

The data position is a pure function of the step (train.data.Batches), so resuming restores the
strategy's state (model, optimizer), the RNG and the trainer's own state (step, tokens). A final
checkpoint is saved before the export: a failed export is redone by --resume, without training.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from gqa_convert.data.tokens import read_head
from gqa_convert.errors import GQAConvertError
from gqa_convert.evaluation import perplexity_of
from gqa_convert.report.recovery import refresh_recovery_plot
from gqa_convert.train.checkpoint import checkpoint_dir, load_checkpoint, prune_checkpoints, save_checkpoint
from gqa_convert.train.data import Batches
from gqa_convert.train.export import export_model
from gqa_convert.train.losses import LossParts, Weights
from gqa_convert.train.metrics import MetricsLog, TrainProgress, trim_metrics
from gqa_convert.train.plan import WORKER_ENV, TrainPlan
from gqa_convert.train.references import source_reference
from gqa_convert.train.runtime import (
    Runtime,
    check_shared_out,
    die_with_parent,
    follow_owner,
    report_error,
    start,
    stop,
    writing,
)
from gqa_convert.train.strategies import STRATEGIES, Strategy


def learning_rate(step: int, total_steps: int, lr: float, min_lr_ratio: float, warmup_steps: int | None) -> float:
    """The rate of optimizer step `step` (counted from 0): linear warmup (default 2% of the steps, at
    least 1), then cosine decay to lr x min_lr_ratio at the last step."""
    total = max(1, total_steps)
    warmup = warmup_steps if warmup_steps is not None else max(1, round(0.02 * total))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_strategy(plan: TrainPlan, runtime: Runtime) -> Strategy:
    """The plan's strategy (its registry entry names the class), prepared: models loaded into their
    layout, wrapped, the optimizer built."""
    module, _, name = STRATEGIES[plan.strategy].implementation.partition(":")
    strategy = getattr(importlib.import_module(module), name)(runtime, plan)
    strategy.prepare()
    return strategy


class Trainer:
    """What one worker trains with; its own resumable state is the step and the tokens trained on."""

    def __init__(self, plan: TrainPlan, runtime: Runtime) -> None:
        settings = plan.settings
        check_shared_out(runtime, plan.out)
        torch.manual_seed(settings.seed)
        self.plan, self.runtime, self.settings = plan, runtime, settings
        self.strategy = build_strategy(plan, runtime)
        self.batches = Batches(
            plan.train_tokens,
            settings.seq_len,
            settings.seed,
            settings.micro_batch_size,
            runtime.world,
            plan.vocab_size,
        )
        self.eval_ids = None
        if plan.eval_tokens:
            self.eval_ids = torch.from_numpy(read_head(plan.eval_tokens, settings.eval_tokens))
            if self.eval_ids.numel() and int(self.eval_ids.max()) >= plan.vocab_size:
                raise GQAConvertError(
                    f"{settings.eval_data} holds ids outside the model's vocabulary: tokenize it again"
                )
        self.weights = Weights()
        if settings.teacher is not None:
            self.weights = Weights(1 - settings.distill_weight, settings.distill_weight, settings.distill_temperature)
        if settings.report_to != "none":
            tracked = {k: v for k, v in vars(settings).items() if v is not None}
            runtime.accelerator.init_trackers("gqa-convert", config=tracked)
        self.metrics = MetricsLog(plan.out, runtime.accelerator, runtime.is_main)
        self.step = self.tokens = 0
        self.clock = time.perf_counter()  # when the step being timed started (train, settle)
        self.saved = 0  # the step of the newest checkpoint on disk

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens = state["step"], state["tokens"]

    # ---- phases ----
    def resume(self) -> None:
        """The checkpoint rank 0's launcher chose (every process loads that one); the metrics log
        trimmed to it."""
        chosen = torch.tensor([self.plan.resume_step or 0], dtype=torch.int64, device=self.runtime.device)
        torch.distributed.broadcast(chosen, src=0)  # the same choice on every machine
        step = int(chosen.item())
        if step:
            folder = checkpoint_dir(self.plan.out, step)
            fmt = STRATEGIES[self.plan.strategy].checkpoint_format
            self.load_state_dict(load_checkpoint(self.strategy, folder, self.runtime.world, fmt))
            self.saved = self.step
            self.runtime.accelerator.print(f"resumed from {folder.name}: step {self.step}, {self.tokens:,} tokens")
        if self.runtime.is_main:
            trim_metrics(self.metrics.path, self.step)
        torch.distributed.barrier()

    def train(self) -> None:
        """Train to the step budget: a step, then evaluation, logging and a checkpoint as they fall due.

        On GPUs a step's record (its loss, gradient norm) is read back from the device once the next
        step has been queued, so the host never waits for the device between steps; it is read at
        once when an evaluation, a checkpoint or the end falls due. Every step's record is written."""
        first = self.step
        progress = TrainProgress(self.runtime.is_main, self.plan.steps, self.step)
        epoch = self.batches.epoch_of(self.tokens // self.settings.seq_len)
        if self.step == 0 and self.eval_ids is not None:  # the curve's starting point and its reference
            source = source_reference(self.strategy, self.eval_ids, self.settings, self.runtime.accelerator)
            self.log({"step": 0, "tokens": 0, **self.evaluate(), **source})
        self.strategy.model.train()
        deferred = self.defers_reading()
        pending: dict[str, Any] | None = None  # the previous step's record, not yet read back
        while self.step < self.plan.steps:
            if pending is None:  # nothing in flight: this step's time starts now
                self.clock = time.perf_counter()
            record = self.train_step()
            self.step, self.tokens = record["step"], record["tokens"]
            if self.step == first + 1:
                self.report_shares()
            new_epoch = self.batches.epoch_of(self.tokens // self.settings.seq_len - 1)
            if new_epoch != epoch:
                self.runtime.accelerator.print(
                    f"data exhausted: starting epoch {new_epoch + 1} (blocks reshuffled, seed {self.settings.seed})"
                )
                epoch = new_epoch
            if pending is not None:
                self.log(self.settle(pending), progress=progress)
                pending = None
            evaluate = self.eval_ids is not None and self.evaluation_due()
            save = self.step % self.settings.save_every == 0 or self.step == self.plan.steps
            if deferred and not (evaluate or save):
                pending = record
                continue
            record = self.settle(record)
            if evaluate:
                record.update(self.evaluate())
            self.log(record, progress=progress)
            if save:
                self.checkpoint()
        progress.close()

    def defers_reading(self) -> bool:
        """Whether a step's record is read back one step late: on GPUs; on CPU reading costs no wait."""
        return self.runtime.device.type == "cuda"

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics record, its
        measured values still on the device (settle reads them)."""
        plan, runtime = self.plan, self.runtime
        lr = learning_rate(
            self.step, plan.steps, self.settings.lr, self.settings.min_lr_ratio, self.settings.warmup_steps
        )
        self.strategy.set_hyperparameters(lr)
        lm_sum = torch.zeros((), device=runtime.device)
        kd_sum = torch.zeros((), device=runtime.device)
        for micro in range(plan.grad_accum):
            ids = self.batches.read(self.step, micro, runtime.rank, plan.grad_accum)
            parts = self.forward_backward(torch.from_numpy(ids).to(runtime.device), last=micro == plan.grad_accum - 1)
            lm_sum += parts.lm
            kd_sum += parts.kd
        grad_norm = self.strategy.step()
        reduce = runtime.accelerator.reduce
        record = {
            "step": self.step + 1,
            "tokens": (self.step + 1) * plan.step_tokens,
            "loss": reduce(lm_sum / plan.grad_accum, "mean"),  # the LM loss, with or without a teacher
            "lr": lr,
            "grad_norm": grad_norm,
        }
        if self.strategy.teacher is not None:
            record["distill_loss"] = reduce(kd_sum / plan.grad_accum, "mean")
        return record

    def settle(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with its values read back (waiting for its step to finish) and the step's
        throughput: tokens over the time since the previous step finished (or this one started)."""

        def read(key: str, digits: int) -> float | None:
            return None if record.get(key) is None else round(float(record[key]), digits)

        settled = {"step": record["step"], "tokens": record["tokens"], "loss": read("loss", 6), "lr": record["lr"]}
        now = time.perf_counter()
        settled["tokens_per_s"] = round(self.plan.step_tokens / max(now - self.clock, 1e-9), 1)
        self.clock = now
        settled["grad_norm"] = read("grad_norm", 4)
        if "distill_loss" in record:
            settled["distill_loss"] = read("distill_loss", 6)
        return settled

    def forward_backward(self, inputs: torch.Tensor, last: bool) -> LossParts:
        """One micro-batch: the teacher's hidden states, the student's chunked losses, backward."""
        strategy = self.strategy
        with strategy.micro_step(last=last):
            teacher_hidden = None
            if strategy.teacher is not None:
                with torch.no_grad(), strategy.autocast():
                    teacher_hidden = strategy.teacher(inputs)
            with self._teacher_head() as teacher_head, strategy.autocast():
                parts = strategy.model(
                    inputs,
                    labels=inputs,
                    teacher_hidden=teacher_hidden,
                    teacher_head=teacher_head,
                    weights=self.weights,
                )
            strategy.backward(parts.loss)
        return parts

    @contextlib.contextmanager
    def _teacher_head(self) -> Iterator[Any]:
        if self.strategy.teacher is None:
            yield None
        else:
            with self.strategy.teacher_head() as head:
                yield head

    def evaluation_due(self) -> bool:
        """At every --eval-every steps and at the last step (the curve's end point)."""
        every = self.settings.eval_every
        return self.step == self.plan.steps or (bool(every) and self.step % every == 0)

    def evaluate(self) -> dict[str, float]:
        with self.strategy.autocast():
            result = perplexity_of(
                self.strategy.model,
                self.eval_ids,
                self.settings.seq_len,
                self.settings.micro_batch_size,
                self.runtime.accelerator,
            )
        self.strategy.after_eval()
        return {"eval_perplexity": round(result["perplexity"], 4), "eval_tokens": result["tokens"]}

    def log(self, record: dict[str, Any], progress: TrainProgress | None = None) -> None:
        with writing("metrics.jsonl", self._kept(), path=self.metrics.path):
            self.metrics.write(record)
            plotted = "eval_perplexity" in record or record["step"] % self.settings.save_every == 0
            if self.runtime.is_main and (plotted or record["step"] == self.plan.steps):
                refresh_recovery_plot(self.plan.out, self.settings.model)
        if progress is not None:
            progress.update(record["step"], record["tokens"], record["loss"])

    def checkpoint(self) -> None:
        fmt = STRATEGIES[self.plan.strategy].checkpoint_format
        folder = checkpoint_dir(self.plan.out, self.step)
        with writing(f"checkpoint {folder.name}", self._kept(), path=folder):
            save_checkpoint(self.strategy, folder, self.state_dict(), self.plan.identity, fmt)
            if self.runtime.is_main:
                prune_checkpoints(self.plan.out, self.settings.keep_checkpoints)
        self.saved = self.step

    def export(self) -> None:
        with writing("the final model", self._kept(), "rerun with --resume to export it", path=self.plan.out):
            export_model(self.strategy, self.plan, self.step, self.tokens)

    def _kept(self) -> str:
        return f"the checkpoint of step {self.saved} is kept" if self.saved else "no checkpoint is kept"

    def report_shares(self) -> None:
        """Which part of the model and optimizer state each process holds (every rank calls it)."""
        shares = [None] * self.runtime.world
        torch.distributed.all_gather_object(shares, self.strategy.shares())
        if self.runtime.is_main:
            for rank, share in enumerate(shares):
                held = ", ".join(f"{name} {local:,}/{total:,}" for name, (local, total) in share.items())
                print(f"{self.plan.strategy} rank {rank}/{self.runtime.world} holds {held}", flush=True)


def run_worker(plan: TrainPlan) -> None:
    """Start, build, resume if asked, train to the step budget, evaluate, export."""
    runtime = start(plan)
    try:
        with writing("a file in OUT", "the last checkpoint is kept"):
            trainer = Trainer(plan, runtime)
            trainer.resume()
            trainer.train()
        trainer.export()
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
