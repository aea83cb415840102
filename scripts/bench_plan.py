"""How long `uptrain --dry-run` takes to plan, and how much memory the command uses, for a ~3 GB
sharded checkpoint (random bf16 weights written here into a temporary folder) under ddp, fsdp2 and
deepspeed at 1, 8 and 64 processes, and for a Llama-3-70B-shaped config.json alone (no weights).
Each plan runs as `/usr/bin/time -v gqa-convert uptrain ... --dry-run --json` in a fresh process:
wall time and peak RSS of the whole command (interpreter and imports included); and, in another
fresh process, the time of the planning alone (plan_run, after the imports).

    python scripts/bench_plan.py [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARDED = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=5632,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
    max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16",
)  # fmt: skip
LLAMA_70B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
)  # fmt: skip
SHARD_BYTES = 1 << 30
_TIMED = """
import json, sys, time
started = time.perf_counter()
from gqa_convert.cli import app
imported = time.perf_counter()
from gqa_convert.command_line import takes
from gqa_convert.planning.run_plan import plan_run
from gqa_convert.train.settings import TrainSettings
import typer
captured = {}
probe = typer.Typer()
@probe.command()
@takes(TrainSettings, name="settings")
def uptrain(settings: TrainSettings = None):
    captured["settings"] = settings
probe([arg for arg in sys.argv[4:] if arg != "--json"], standalone_mode=False)
planning = time.perf_counter()
plan_run(captured["settings"])
print(json.dumps({"import_s": round(imported - started, 2), "planning_s": round(time.perf_counter() - planning, 2)}))
"""


def write_checkpoint(folder: Path, config: dict) -> int:
    """Random bf16 weights under transformers' names, in ~1 GiB safetensors shards with an index."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        size += 2 * torch.Size(shape).numel()
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for index, shard in enumerate(shards, 1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            key: torch.randn(shape, generator=generator, dtype=torch.bfloat16) * 0.02 for key, shape in shard.items()
        }
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def plan(model: Path, out: Path, strategy: str, processes: int) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "gqa_convert.cli", "uptrain", str(model), "-o", str(out)]
    command += ["--data", "unused.txt", "--tokens", "2B", "--seq-len", "4096", "--micro-batch-size", "1"]
    command += ["--strategy", strategy, "--num-processes", str(processes), "--gpu", "h100", "--dry-run", "--json"]
    if processes > 8:
        command += ["--num-machines", str(processes // 8), "--main-process-ip", "10.0.0.1"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) * 1024
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    hours, minutes, seconds = (float(part or 0) for part in clock.groups())
    planned = json.loads(result.stdout)
    timed = subprocess.run([sys.executable, "-c", _TIMED, *command[3:]], capture_output=True, text=True, check=True)
    return {
        **json.loads(timed.stdout.splitlines()[-1]),
        "strategy": strategy,
        "processes": processes,
        "wall_s": round(hours * 3600 + minutes * 60 + seconds, 2),
        "peak_rss_mib": round(rss / 2**20),
        "required_gib": round(planned["memory"]["required"] / 2**30, 2),
        "fits_h100": planned["fits"],
        "first_change": planned["changes"][0]["change"] if planned["changes"] else None,
        "out_written": out.exists(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the checkpoint (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        sharded, alone = work / "sharded-3gb", work / "llama-70b-config"
        started = time.perf_counter()
        size = write_checkpoint(sharded, SHARDED)
        print(f"wrote {size / 1e9:.2f} GB in {len(list(sharded.glob('*.safetensors')))} shards "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        alone.mkdir(parents=True, exist_ok=True)
        (alone / "config.json").write_text(json.dumps(LLAMA_70B))
        rows = []
        for model in (sharded, alone):
            for strategy in ("ddp", "fsdp2", "deepspeed"):
                for processes in (1, 8, 64):
                    row = {"model": model.name, **plan(model, work / "never-written", strategy, processes)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        print(json.dumps({"worst_wall_s": max(r["wall_s"] for r in rows),
                          "worst_peak_rss_mib": max(r["peak_rss_mib"] for r in rows)}))  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
