"""Throughput of `gqa-convert uptrain` against a plain Hugging Face Trainer, like for like: the same
model (saved once, loaded by both), the same token blocks in the same order (uptrain's token folder
and block order, fed to the Trainer sequentially), the same batch and sequence length, the same
AdamW (uptrain's parameter groups, betas, eps and fused kernel, passed to the Trainer), the same
learning-rate schedule and clipping, the same precision, no evaluation and no checkpoint while
stepping. Each run is its own process; runs alternate (A B B A A B ...) and each tool's figure is the
median over its runs of the median step. A step is the wall time between two consecutive step ends,
seen as the line each tool appends per step (uptrain's metrics.jsonl, the Trainer's log), so it
includes data loading, the optimizer, logging and every other per-step cost of either tool.

    python scripts/bench_uptrain.py --data TEXT [--steps 30 --repeats 3 --report bench_uptrain.json]
    python scripts/bench_uptrain.py --data TEXT --compile on          # uptrain's decoder blocks compiled
    python scripts/bench_uptrain.py --data TEXT --gpu                   # ~1.1B Llama in bf16: tokens/s and MFU
    python scripts/bench_uptrain.py --data TEXT --gpu --strategy fsdp2 --skip-trainer

MFU = (6 N + 12 L d s) x tokens/s / peak, with N the parameter count, L layers, d hidden size, s sequence
length, peak 989 TFLOP/s (H100 SXM dense bf16) unless --peak-tflops says otherwise. The report (JSON)
holds every run's step times, tokens/s and final loss, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

POLL_S = 0.002
LR = 1e-4


def build_model(folder: Path, gpu: bool, tokenizer_source: Path | None) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if gpu:  # TinyLlama-1.1B's shape
        shape = dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        )
    else:
        shape = dict(
            hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2
        )
    tokenizer = _tokenizer(folder, tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _tokenizer(folder: Path, source: Path | None):
    from transformers import AutoTokenizer

    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import save_tiny_tokenizer

        tokenizer = save_tiny_tokenizer(folder, vocab_size=2000)
    tokenizer.save_pretrained(folder)
    return tokenizer


def watch(command: list[str], lines: Path, log: Path) -> list[tuple[float, dict]]:
    """Run `command`; return (arrival time, row) of every line appended to `lines` while it runs."""
    arrivals: list[tuple[float, dict]] = []
    offset, pending = 0, b""
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        while True:
            finished = process.poll() is not None
            if lines.exists() and lines.stat().st_size > offset:
                with open(lines, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                offset += len(chunk)
                now = time.perf_counter()
                *complete, pending = (pending + chunk).split(b"\n")
                arrivals += [(now, json.loads(line)) for line in complete if line.strip()]
            if finished:
                break
            time.sleep(POLL_S)
    if process.returncode != 0:
        raise SystemExit(f"{command[:6]} failed:\n" + log.read_text()[-3000:])
    return arrivals


def summarize(arrivals: list[tuple[float, dict]], warmup: int, step_tokens: int) -> dict:
    steps = [(at, row) for at, row in arrivals if row.get("step", 0) > 0]
    ends = [at for at, _ in steps]
    seconds = [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:])]
    return {
        "step_s": [round(s, 4) for s in seconds],
        "tokens_per_s": round(step_tokens / statistics.median(seconds), 1),
        "final_loss": steps[-1][1]["loss"],
        "steps": len(steps),
    }


def run_ours(model: Path, tokens: Path, args: argparse.Namespace, work: Path) -> list[tuple[float, dict]]:
    out = work / "out"
    command = [sys.executable, "-m", "gqa_convert.cli", "uptrain", str(model), "-o", str(out), "--data", str(tokens)]
    command += ["--tokens", str(args.steps * args.micro_batch_size * args.seq_len), "--seq-len", str(args.seq_len)]
    command += ["--micro-batch-size", str(args.micro_batch_size), "--lr", str(LR), "--warmup-steps", "1"]
    command += ["--min-lr-ratio", "0", "--save-every", str(10**9), "--num-processes", "1", "--strategy", args.strategy]
    command += ["--mixed-precision", "bf16" if args.gpu else "no", "--compile", args.compile]
    return watch(command, out / "metrics.jsonl", work / "log.txt")


def run_trainer(model: Path, tokens: Path, args: argparse.Namespace, work: Path) -> list[tuple[float, dict]]:
    lines = work / "steps.jsonl"
    child = {**vars(args), "model": str(model), "tokens_folder": str(tokens), "lines": str(lines), "work": str(work)}
    command = [sys.executable, __file__, "--trainer-child", json.dumps(child, default=str)]
    return watch(command, lines, work / "log.txt")


def trainer_child(spec: dict) -> None:
    """One Trainer run: uptrain's blocks in uptrain's order, its optimizer and schedule."""
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from gqa_convert.data.tokens import TokenBlocks
    from gqa_convert.train.loop import learning_rate
    from gqa_convert.train.settings import TrainSettings
    from gqa_convert.train.strategies.loading import build_optimizer

    steps, micro, seq_len = spec["steps"], spec["micro_batch_size"], spec["seq_len"]
    blocks = TokenBlocks(spec["tokens_folder"], seq_len, seed=0)  # uptrain's --seed default
    order = [torch.from_numpy(blocks.block(index)) for index in range(steps * micro)]

    class Blocks(Dataset):
        def __len__(self) -> int:
            return len(order)

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {"input_ids": order[index], "labels": order[index]}

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class StepLines(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **kwargs):
            if logs and "loss" in logs:
                with open(spec["lines"], "a") as handle:
                    handle.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    settings = TrainSettings(
        model=spec["model"], out="unused", data="unused", lr=LR, tokens=1
    )  # the optimizer's settings
    optimizer = build_optimizer(model, settings.weight_decay, settings.lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, steps, 1.0, 0.0, 1))
    training = TrainingArguments(
        output_dir=str(Path(spec["work"]) / "trainer"),
        per_device_train_batch_size=micro,
        max_steps=steps,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=spec["gpu"],
        use_cpu=not spec["gpu"],
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    InOrder(
        model=model, args=training, train_dataset=Blocks(), optimizers=(optimizer, schedule), callbacks=[StepLines()]
    ).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a text file")
    parser.add_argument("--tokenizer", type=Path, help="a folder with a tokenizer (default: one trained here)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (at least 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool (at least 3 for a median)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2"], help="uptrain's strategy (one process)")
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="uptrain's --compile (its compilation falls in the warmup steps, left out of the timing)",
    )
    parser.add_argument("--report", type=Path, default=Path("bench_uptrain.json"), help="the JSON report")
    parser.add_argument("--trainer-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_child:
        trainer_child(json.loads(args.trainer_child))
        return
    if not args.data or args.warmup < 1 or args.steps <= args.warmup + 1:
        parser.error("--data is required, and --steps must exceed --warmup (at least 1) by 2 or more")
    args.seq_len = args.seq_len or (2048 if args.gpu else 256)
    args.micro_batch_size = args.micro_batch_size or (8 if args.gpu else 4)
    work = Path(tempfile.mkdtemp(prefix="bench-uptrain-"))
    env_note = {"machine": os.uname().nodename, "cpus": os.cpu_count()}
    try:
        from gqa_convert.data.tokenize import TokenizeOptions, tokenize

        model, tokens = work / "model", work / "tokens"
        parameters = build_model(model, args.gpu, args.tokenizer)
        tokenize(args.data, tokens, TokenizeOptions(tokenizer=str(model), progress=False))
        step_tokens = args.micro_batch_size * args.seq_len
        tools = ["ours"] if args.skip_trainer else ["ours", "trainer"]
        order = [tools[(i // 2 + i) % len(tools)] for i in range(len(tools) * args.repeats)]  # A B B A A B ...
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for index, tool in enumerate(order):
            scratch = work / f"run-{index}-{tool}"
            scratch.mkdir()
            runner = run_ours if tool == "ours" else run_trainer
            summary = summarize(runner(model, tokens, args, scratch), args.warmup, step_tokens)
            runs[tool].append(summary)
            print(
                f"{tool:8s} run {len(runs[tool])}: {summary['tokens_per_s']} tokens/s, final loss {summary['final_loss']}",
                flush=True,
            )
        result: dict[str, object] = {
            "device": torch.cuda.get_device_name() if args.gpu else "cpu",
            **env_note,
            "parameters": parameters,
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "strategy": args.strategy,
            "compile": args.compile,
            "order": order,
        }
        for tool in tools:
            result[f"{tool}_tokens_per_s"] = statistics.median(run["tokens_per_s"] for run in runs[tool])
            result[f"{tool}_final_loss"] = [run["final_loss"] for run in runs[tool]]
        if not args.skip_trainer:
            result["ratio"] = round(result["ours_tokens_per_s"] / result["trainer_tokens_per_s"], 3)
        if args.gpu:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model)
            flops_per_token = 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * args.seq_len
            result["mfu"] = round(flops_per_token * result["ours_tokens_per_s"] / (args.peak_tflops * 1e12), 4)
        result["runs"] = runs
        args.report.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        print(f"report: {args.report}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
