"""The plan's predicted memory per process against the peak measured during real uptrain steps on this
machine's CPU: one process, or several over gloo (torchrun), for ddp and fsdp2 and their variants
(checkpointing, --trainable attention, accumulation, a teacher).

    python scripts/check_memory_plan.py [--processes 1 2] [--cases "strategy=ddp" "strategy=fsdp2,checkpointing=1" ...]

Measured: the peak of allocated CPU tensor bytes during the third training step (optimizer state
allocated), from torch.profiler's memory events, on every process. The CPU allocator's running total
is switched on for every thread (c10's caffe2_report_cpu_memory_usage), so tensors that gloo's threads
free are counted too. This is tensor memory, what a GPU's memory holds; RSS would add the interpreter,
libraries and the allocator's cached pages.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = "GQA_CHECK_PLAN"
SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "sample.txt"
SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
DEFAULT_CASES = [
    "strategy=ddp",
    "strategy=ddp,checkpointing=1",
    "strategy=ddp,trainable=attention",
    "strategy=ddp,accumulation=2",
    "strategy=ddp,teacher=1",
    "strategy=fsdp2",
    "strategy=fsdp2,checkpointing=1",
    "strategy=fsdp2,trainable=attention",
    "strategy=fsdp2,teacher=1",
]


def measure_in_worker() -> None:
    """A worker process: train three steps under the profiler, print this rank's peak."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    ctypes.c_bool.in_dll(ctypes.CDLL(library), "FLAGS_caffe2_report_cpu_memory_usage").value = True
    from gqa_convert.train.loop import Trainer
    from gqa_convert.train.plan import TrainPlan
    from gqa_convert.train.runtime import start, stop

    plan = TrainPlan.from_json(os.environ[CHILD])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        runtime = start(plan)
        trainer = Trainer(plan, runtime)
        for step in range(3):
            with record_function(f"checked step {step}"):
                trainer.step = trainer.train_step()["step"]
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    profiler.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    memory = [(e["ts"], e["args"]["Total Allocated"]) for e in events if e["name"] == "[memory]"]
    last = next(e for e in events if e["name"] == "checked step 2" and "dur" in e)
    peak = max(total for ts, total in memory if last["ts"] <= ts <= last["ts"] + last["dur"])
    print(f"\nchecked rank {runtime.rank} peak {peak}", flush=True)
    stop(runtime)


def check(case: str, processes: int, work: Path, models: dict[str, Path]) -> dict:
    from gqa_convert.planning.memory import StepSetup, plan_memory
    from gqa_convert.planning.shapes import model_shape, read_config
    from gqa_convert.train.plan import WORKER_ENV, prepare
    from gqa_convert.train.settings import TrainSettings

    options = dict(item.split("=") for item in case.split(","))
    accumulation = int(options.get("accumulation", 1))
    settings = TrainSettings(
        model=str(models["student"]), out=str(work / "out"), data=str(SAMPLE), seq_len=128, micro_batch_size=4,
        tokens=str(3 * 4 * 128 * accumulation * processes), grad_accum=accumulation, num_processes=processes,
        strategy=options["strategy"], gradient_checkpointing=options.get("checkpointing") == "1",
        trainable=options.get("trainable", "all"), teacher=str(models["teacher"]) if options.get("teacher") else None,
    )  # fmt: skip
    plan = prepare(settings)
    env = {**os.environ, CHILD: plan.to_json(), WORKER_ENV: plan.to_json()}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), __file__]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    peaks = [int(peak) for peak in re.findall(r"checked rank \d+ peak (\d+)", result.stdout)]
    if len(peaks) != processes:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-3000:])
    setup = StepSetup(
        strategy=settings.strategy, world=processes, precision="no", device="cpu", micro_batch=4, seq_len=128,
        grad_accum=accumulation, checkpointing=settings.gradient_checkpointing, trainable=settings.trainable,
    )  # fmt: skip
    teacher = model_shape(read_config(settings.teacher)) if settings.teacher else None
    predicted = plan_memory(model_shape(read_config(settings.model)), setup, teacher)
    measured = max(peaks)
    return {
        "case": case,
        "processes": processes,
        "measured_mib": round(measured / 2**20, 2),
        "predicted_mib": round(predicted.peak / 2**20, 2),
        "error": f"{predicted.peak / measured - 1:+.1%}",
        "predicted_phase": predicted.peak_phase,
    }


def main() -> None:
    if os.environ.get(CHILD):
        measure_in_worker()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    args = parser.parse_args()
    import torch
    import transformers

    sys.path.insert(0, str(SAMPLE.parents[1]))
    from tiny_models import save_tiny_tokenizer

    work = Path(tempfile.mkdtemp(prefix="check-memory-plan-"))
    models = {"student": work / "student", "teacher": work / "teacher"}
    for name, folder in models.items():
        vocab = len(save_tiny_tokenizer(folder, vocab_size=2000))
        kv = SHAPE["num_attention_heads"] if name == "teacher" else SHAPE["num_key_value_heads"]
        config = transformers.LlamaConfig(
            **{**SHAPE, "num_key_value_heads": kv}, vocab_size=vocab, tie_word_embeddings=False
        )
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for processes in args.processes:
        for index, case in enumerate(args.cases):
            print(json.dumps(check(case, processes, work / f"{processes}-{index}", models)), flush=True)


if __name__ == "__main__":
    main()
