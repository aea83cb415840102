"""Benchmark `gqa-convert pool` against the I/O floor (`cp -r`) and the naive way (load the whole model
in transformers, pool, save_pretrained), on synthetic bf16 MHA Llama checkpoints of two sizes.

    python scripts/bench_pool.py [--workdir bench-out] [--layers 12 24] [--skip-naive]

Reports wall time and peak anonymous memory (RssAnon, sampled every 10 ms) of each run; page-cache
dirty data is flushed (sync) before each timed run. Ratios are against cp in the same run: this
machine is shared and its disk is noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

HIDDEN, HEADS, INTERMEDIATE, VOCAB = 2048, 16, 5504, 32000


def build_checkpoint(folder: Path, layers: int) -> int:
    """A Llama-shaped MHA checkpoint in bf16, sharded at 1 GB, written one shard at a time."""
    from safetensors.torch import save_file

    from gqa_convert.units import parse_size

    folder.mkdir(parents=True)
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            shapes[p + f"self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    shard_bytes, shards, current, size = parse_size("1GB"), [], {}, 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in shard.items()}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(shard, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


NAIVE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    src, out, g = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.data.reshape(g, -1, hd, cfg.hidden_size).float().mean(1)
            proj.weight = torch.nn.Parameter(w.reshape(g * hd, cfg.hidden_size).to(torch.bfloat16))
            proj.out_features = g * hd
    cfg.num_key_value_heads = g
    model.save_pretrained(out)
    """
)


def measure(command: list[str]) -> dict[str, float]:
    """Wall time and peak RssAnon (MiB) of a command, sampled every 10 ms."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with {process.returncode}")
    return {"wall_s": round(wall, 2), "peak_rss_anon_mib": round(peak / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    tool = [sys.executable, "-m", "gqa_convert.cli"]
    startup = measure(tool + ["--help"])
    results = {"interpreter_start_s": startup["wall_s"], "sizes": []}
    for layers in args.layers:
        src = args.workdir / f"mha-{layers}L"
        size = build_checkpoint(src, layers)
        row = {"layers": layers, "checkpoint_gb": round(size / 1e9, 2)}
        row["cp"] = measure(["cp", "-r", str(src), str(args.workdir / "copy")])
        row["gqa_convert"] = measure(
            tool
            + [
                "pool",
                str(src),
                "-o",
                str(args.workdir / "pooled"),
                "--kv-heads",
                str(args.kv_heads),
                "--recipe",
                "mean",
            ]
        )
        if not args.skip_naive:
            row["naive"] = measure(
                [sys.executable, "-c", NAIVE, str(src), str(args.workdir / "naive"), str(args.kv_heads)]
            )
        row["ratio_vs_cp"] = round(row["gqa_convert"]["wall_s"] / row["cp"]["wall_s"], 2)
        row["ratio_vs_cp_plus_start"] = round(
            row["gqa_convert"]["wall_s"] / (row["cp"]["wall_s"] + startup["wall_s"]), 2
        )
        results["sizes"].append(row)
        print(json.dumps(row), flush=True)
        for name in ("copy", "pooled", "naive"):
            shutil.rmtree(args.workdir / name, ignore_errors=True)
        shutil.rmtree(src)
    (Path(args.workdir) / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
