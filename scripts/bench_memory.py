"""Peak memory of one distillation step (teacher forward, student forward, LM + KL loss, backward) with
full-vocabulary logits (transformers' labels= loss and a KL over full log-softmaxes, as uptrain computed
them before) against uptrain's chunked losses. Each variant and measure runs in a fresh process.

    python scripts/bench_memory.py [--vocab 128256 --seq-len 2048 --micro-batch-size 1 --hidden 256 --layers 2]

The model body is small on purpose (hidden 256, 2 layers, fp32 on CPU) so that what differs, the
[batch, seq, vocab] tensors of the loss, dominates. Two measures:
  rss       the process's peak resident memory (ru_maxrss) after the step, and its RSS just before it
  profiler  torch.profiler's peak of "Total Allocated" during the step (tensor bytes only)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MIB = 2**20


def current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def full_logits_loss(student, teacher, ids, weight: float, temperature: float):
    """The unchunked computation: full logits of both models, HF's shifted CE, KL of full log-softmaxes."""
    import torch

    output = student(input_ids=ids, labels=ids)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    s = torch.log_softmax(output.logits[:, :-1].float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")
    return (1 - weight) * output.loss + weight * kl * temperature**2


def chunked_loss(student, teacher, ids, weight: float, temperature: float):
    import torch

    from gqa_convert.train.losses import Weights, head_of

    with torch.no_grad():
        hidden = teacher(ids)
    weights = Weights(1 - weight, weight, temperature)
    return student(
        ids, labels=ids, teacher_hidden=hidden, teacher_head=head_of(teacher.causal_lm), weights=weights
    ).loss


def child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqa_convert.train.losses import CausalLMWithChunkedLoss, FrozenTeacher

    def config(kv_heads: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=kv_heads,
            max_position_embeddings=args.seq_len, tie_word_embeddings=False, use_cache=False,
        )  # fmt: skip

    torch.manual_seed(0)
    student, teacher = LlamaForCausalLM(config(2)), LlamaForCausalLM(config(4))
    teacher.eval().requires_grad_(False)
    ids = torch.randint(0, args.vocab, (args.micro_batch_size, args.seq_len))
    if args.variant == "chunked":
        student, teacher = CausalLMWithChunkedLoss(student), FrozenTeacher(teacher)
    loss_of = chunked_loss if args.variant == "chunked" else full_logits_loss

    def step() -> float:
        loss = loss_of(student, teacher, ids, 0.5, 2.0)
        loss.backward()
        return float(loss.detach())

    before = current_rss()
    started = time.perf_counter()
    if args.measure == "profiler":
        return {"variant": args.variant, **profiled(step)}
    loss = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": args.variant, "loss": loss, "rss_before_step_mib": round(before / MIB),
        "peak_rss_mib": round(peak / MIB), "step_increase_mib": round((peak - before) / MIB),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def profiled(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step()
    trace = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    prof.export_chrome_trace(trace)
    with open(trace) as handle:
        events = [e for e in json.load(handle)["traceEvents"] if e.get("name") == "[memory]"]
    os.unlink(trace)
    totals = [e["args"]["Total Allocated"] for e in sorted(events, key=lambda e: e["ts"])]
    return {"loss": loss, "profiler_step_peak_mib": round((max(totals) - totals[0]) / MIB)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--variants", default="full,chunked")
    parser.add_argument("--measures", default="rss,profiler")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)), flush=True)
        return
    logits_mib = args.micro_batch_size * args.seq_len * args.vocab * 4 / MIB
    print(
        f"vocab {args.vocab}, seq {args.seq_len}, micro-batch {args.micro_batch_size}, hidden {args.hidden}, "
        f"{args.layers} layers, fp32 on CPU; one full fp32 logits tensor: {logits_mib:,.0f} MiB",
        flush=True,
    )
    shape = ["--vocab", args.vocab, "--seq-len", args.seq_len, "--micro-batch-size", args.micro_batch_size]
    shape += ["--hidden", args.hidden, "--layers", args.layers]
    for measure in args.measures.split(","):
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, "--variant", variant, "--measure", measure, *map(str, shape)]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = result.stdout.strip().splitlines()
            print(f"{measure:8s} {lines[-1] if lines else result.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
