"""The uptrain entry point: prepare the plan (train.plan), then run the workers (in this process for one
process on one machine, else under `accelerate launch`), or only time one step (dry run). A worker's
user error comes back as one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import load_causal_lm
from gqa_convert.planning.run_plan import plan_run
from gqa_convert.report.metrics import METRICS_FILE, last_trained, read_records
from gqa_convert.train.data import Batches
from gqa_convert.train.export import exported
from gqa_convert.train.loop import run_worker
from gqa_convert.train.losses import CausalLMWithChunkedLoss
from gqa_convert.train.plan import WORKER_ENV, TrainPlan, prepared
from gqa_convert.train.runtime import ERROR_ENV, OWNER_ENV, die_with_parent, process_identity
from gqa_convert.train.settings import TrainSettings
from gqa_convert.train.strategies import STRATEGIES


def uptrain(settings: TrainSettings) -> dict[str, Any]:
    """Library entry point: prepare, then train (or only plan, with dry_run). Returns the plan, or the
    final step, tokens and loss read back from OUT."""
    if settings.dry_run and not settings.measure:
        return plan_run(settings).to_dict()  # from the configs alone: no weights, data or OUT are read
    with prepared(settings) as plan:
        if settings.dry_run:
            try:
                measured = dry_run_plan(plan)
            finally:
                if plan.scratch:
                    shutil.rmtree(plan.scratch, ignore_errors=True)
            per_gpu = plan.step_tokens / plan.world_size / max(measured["measured_step_s"], 1e-3)
            timing = {key: measured[key] for key in ("measured_step_s", "estimated_hours")}
            planned = plan_run(settings, (per_gpu, measured["device"])).to_dict()
            return {**planned, **timing, "measured_on": measured["device"]}
        if plan.resume_step == plan.steps and exported(plan):
            print(
                f"{plan.out} is finished (step {plan.steps} of {plan.steps}) and exported: nothing to do",
                file=sys.stderr,
            )
        else:
            launch(plan)
    last = last_trained(read_records(plan.out / METRICS_FILE))
    if last is None:  # the log was removed or emptied by hand; the run itself is complete
        warnings.warn(f"{plan.out / METRICS_FILE} holds no training step: the final loss is not known", stacklevel=2)
        last = {"step": plan.steps, "tokens": plan.steps * plan.step_tokens, "loss": None}
    return {"out": str(settings.out), "steps": last["step"], "tokens": last["tokens"], "final_loss": last["loss"]}


def launch_command(plan: TrainPlan) -> list[str] | None:
    """The `accelerate launch` command, or None to run in this process. Strategies gqa-convert applies
    (ddp, fsdp2) are launched as plain processes (--multi_gpu: an FSDP YAML gives only its process and
    machine settings); one Accelerate applies (deepspeed) with its YAML, whose plugin Accelerate builds."""
    settings, accelerate_applies = plan.settings, STRATEGIES[plan.strategy].launcher_applies
    if os.environ.get(WORKER_ENV) or "LOCAL_RANK" in os.environ:
        return None  # already a worker
    if plan.world_size == 1 and settings.num_machines == 1 and not accelerate_applies:
        return None
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if settings.accelerate_config:
        command += ["--config_file", settings.accelerate_config]
    if not accelerate_applies:
        command += ["--multi_gpu", "--dynamo_backend", "no"]
    command += ["--mixed_precision", plan.precision if accelerate_applies else "no"]
    command += ["--num_processes", str(plan.world_size)]
    if settings.num_machines > 1 or not settings.accelerate_config:  # else the YAML's machines
        command += ["--num_machines", str(settings.num_machines)]
    if settings.machine_rank or settings.num_machines > 1:  # one YAML for every machine: the rank from here
        command += ["--machine_rank", str(settings.machine_rank)]
    if settings.main_process_port is not None:  # on one machine too: the port a scheduler picked
        command += ["--main_process_port", str(settings.main_process_port)]
    if settings.num_machines > 1:
        command += ["--main_process_ip", str(settings.main_process_ip), "--rdzv_backend", "c10d"]
        # machines joining apart (rank 0 finishing its preparation last) wait up to --timeout-minutes
        command += ["--rdzv_conf", f"join_timeout={round(settings.timeout_minutes * 60)}"]
    return command + ["-m", "gqa_convert.train.loop"]


def launch(plan: TrainPlan) -> None:
    """Run the workers: here for one process, else under `accelerate launch`. The launcher's own
    report of a worker that stopped on a user error is not shown: the error is, as one line."""
    command = launch_command(plan)
    if command is None:
        run_worker(plan)
        return
    with tempfile.TemporaryDirectory(prefix="gqa-convert-") as scratch:
        error_file = Path(scratch) / "error"
        owner = process_identity(os.getpid()) or ""
        env = {**os.environ, WORKER_ENV: plan.to_json(), ERROR_ENV: str(error_file), OWNER_ENV: owner}
        # SIGKILL, not a graceful SIGTERM: the launcher has nothing to save (checkpoints are atomic), and its
        # shutdown waits up to 30 s on workers; they end on their own (die_with_parent, follow_owner)
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        assert process.stderr is not None
        for line in process.stderr:
            if not error_file.exists():
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        code = process.wait()
        if error_file.exists():
            raise GQAConvertError(error_file.read_text().strip())
    if code != 0:
        raise GQAConvertError(
            f"training stopped with exit code {code}; rerun with --resume to continue from the last checkpoint"
        )


def dry_run_plan(plan: TrainPlan) -> dict[str, Any]:
    """The run's size, and its duration estimated from one measured step on this machine's device."""
    settings = plan.settings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = CausalLMWithChunkedLoss(load_causal_lm(settings.model, dtype=torch.float32)).to(device)
    batches = Batches(
        plan.train_tokens, settings.seq_len, settings.seed, settings.micro_batch_size, plan.world_size, plan.vocab_size
    )
    timings = []
    for _ in range(2):  # the first step pays for warm-up; the second is the one that counts
        started = time.perf_counter()
        for micro in range(plan.grad_accum):
            inputs = torch.from_numpy(batches.read(0, micro, 0, plan.grad_accum)).to(device)
            model(inputs, labels=inputs).loss.backward()
        model.zero_grad(set_to_none=True)  # measured, not applied
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    step_seconds = timings[-1]
    return {
        "budget": plan.budget_origin,
        "tokens": plan.steps * plan.step_tokens,
        "steps": plan.steps,
        "global_batch_tokens": plan.step_tokens,
        "micro_batch_size": settings.micro_batch_size,
        "grad_accum": plan.grad_accum,
        "processes": plan.world_size,
        "strategy": plan.strategy,
        "seq_len": settings.seq_len,
        "device": device,
        "measured_step_s": round(step_seconds, 3),
        "estimated_hours": round(plan.steps * step_seconds / 3600, 3),
    }
