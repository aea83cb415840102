"""The uptrain entry point: prepare, then run the workers (in this process, or under `accelerate
launch` for several processes or machines), or only plan and time one step (dry run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gqa_convert.errors import GQAConvertError
from gqa_convert.train.checkpoints import read_metrics
from gqa_convert.train.components import build_model, build_optimizer, micro_batch, open_blocks
from gqa_convert.train.loop import run_worker
from gqa_convert.train.prepare import WORKER_ENV, prepare
from gqa_convert.train.settings import TrainPlan, TrainSettings, resolve_precision


def launch_command(plan: TrainPlan) -> list[str] | None:
    """The `accelerate launch` command for several processes, or None to run in this process."""
    settings = plan.settings
    if os.environ.get(WORKER_ENV) or "LOCAL_RANK" in os.environ:
        return None  # already a worker
    if plan.world_size == 1 and settings.num_machines == 1 and not settings.accelerate_config:
        return None
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if settings.accelerate_config:
        command += ["--config_file", settings.accelerate_config]
        if settings.num_processes is not None:
            command += ["--num_processes", str(settings.num_processes)]
        if settings.machine_rank:  # one YAML for every node: the rank comes from the command line
            command += ["--machine_rank", str(settings.machine_rank)]
    else:
        command += ["--multi_gpu", "--num_processes", str(plan.world_size), "--dynamo_backend", "no"]
        command += ["--mixed_precision", resolve_precision(settings.mixed_precision)]
    if settings.num_machines == 1 and not settings.accelerate_config:
        command += ["--num_machines", "1"]
    if settings.num_machines > 1:
        command += ["--num_machines", str(settings.num_machines), "--machine_rank", str(settings.machine_rank)]
        command += ["--main_process_ip", str(settings.main_process_ip)]
        command += ["--main_process_port", str(settings.main_process_port), "--rdzv_backend", "c10d"]
        # machines joining apart (rank 0 finishing its preparation last) wait up to --timeout-minutes
        command += ["--rdzv_conf", f"join_timeout={round(settings.timeout_minutes * 60)}"]
    return command + ["-m", "gqa_convert.train.loop"]


def launch(plan: TrainPlan) -> int:
    """Run the workers: here for one process, else under `accelerate launch` (exit code returned)."""
    command = launch_command(plan)
    if command is None:
        run_worker(plan)
        return 0
    env = {**os.environ, WORKER_ENV: plan.to_json()}
    return subprocess.run(command, env=env).returncode


def dry_run_plan(plan: TrainPlan) -> dict[str, Any]:
    """The run's size, and its duration estimated from one measured step on this machine's device."""
    settings = plan.settings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(settings).to(device)
    optimizer = build_optimizer(model, settings)
    blocks = open_blocks(plan)
    timings = []
    for _ in range(2):  # the first step pays for warm-up; the second is the one that counts
        started = time.perf_counter()
        for micro in range(plan.grad_accum):
            inputs = micro_batch(blocks, plan, 0, micro, 0).to(device)
            model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.zero_grad(set_to_none=True)  # measured, not applied
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
        "seq_len": settings.seq_len,
        "device": device,
        "measured_step_s": round(step_seconds, 3),
        "estimated_hours": round(plan.steps * step_seconds / 3600, 3),
    }


def uptrain(settings: TrainSettings) -> dict[str, Any]:
    """Library entry point: prepare, then train (or only plan, with dry_run). Returns the plan, or
    the final step, tokens and loss read back from OUT."""
    plan = prepare(settings)
    if settings.dry_run:
        try:
            return dry_run_plan(plan)
        finally:
            if plan.scratch:
                shutil.rmtree(plan.scratch, ignore_errors=True)
    code = launch(plan)
    if code != 0:
        raise GQAConvertError(
            f"training stopped with exit code {code}; rerun with --resume to continue from the last checkpoint"
        )
    last = read_metrics(Path(settings.out) / "metrics.jsonl")[-1]
    return {"out": str(settings.out), "steps": last["step"], "tokens": last["tokens"], "final_loss": last["loss"]}
