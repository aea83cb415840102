"""eval against an independent perplexity computation; budget arithmetic; uptrain's bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from gqa_convert.cli import app
from gqa_convert.errors import GQAConvertError
from gqa_convert.train.plan import known_pretraining_tokens, resolve_budget
from gqa_convert.train.settings import TrainSettings
from gqa_convert.units import parse_tokens

from helpers import fails
from tiny_models import build_trainable

SAMPLE = Path(__file__).parent / "data" / "sample.txt"
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval") / "model"
    model = build_trainable(folder, "qwen2")
    with torch.no_grad():  # larger weights: a perplexity far from uniform
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("seq_len", [64, 100])
def test_eval_equals_an_independent_computation(model_dir, seq_len):
    result = runner.invoke(app, ["eval", str(model_dir), "--data", str(SAMPLE), "--seq-len", str(seq_len), "--json"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(SAMPLE.read_text(), add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):  # one window at a time, log-softmax by hand
            window = torch.tensor(ids[start : start + seq_len])
            if len(window) < 2:
                continue
            log_probs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            total -= log_probs[torch.arange(len(window) - 1), window[1:]].sum().item()
            count += len(window) - 1
    assert reported["tokens"] == count == len(ids) - math.ceil(len(ids) / seq_len)
    assert reported["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_eval_max_tokens_and_bad_input(model_dir, tmp_path):
    result = runner.invoke(
        app, ["eval", str(model_dir), "--data", str(SAMPLE), "--seq-len", "50", "--max-tokens", "200", "--json"]
    )
    assert json.loads(result.stdout)["tokens"] == 200 - 4
    fails(["eval", str(model_dir), "--data", str(tmp_path / "missing.txt"), "--seq-len", "64"], "data not found")
    fails(["eval", str(model_dir), "--data", str(SAMPLE), "--seq-len", "100000"], "positions")
    fails(["eval", str(tmp_path), "--data", str(SAMPLE)], "no config.json")


def test_parse_tokens():
    assert parse_tokens("50M") == 50_000_000 and parse_tokens("2B") == 2 * 10**9
    assert parse_tokens("1.5T") == 1_500_000_000_000 and parse_tokens("300000") == 300_000
    with pytest.raises(GQAConvertError, match="not understood"):
        parse_tokens("lots")


def test_budget_from_the_known_table_via_provenance(tmp_path):
    folder = tmp_path / "mqa"
    folder.mkdir()
    (folder / "gqa_convert.json").write_text(json.dumps({"source": "/x/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    assert known_pretraining_tokens(folder) == (2 * 10**12, "smollm2-135m")

    def budget(model: Path, **settings: object) -> tuple[int, str]:
        return resolve_budget(TrainSettings(model=str(model), out="o", data="d", **settings), step_tokens=1 << 20)

    steps, origin = budget(folder, fraction=0.05)
    assert steps == math.ceil(10**11 / (1 << 20)) and steps * (1 << 20) >= 10**11  # whole steps, at most one above
    assert origin == "0.05 x 2,000,000,000,000 tokens (published budget of smollm2-135m)"
    other = tmp_path / "Llama-2-7b-hf"
    other.mkdir()
    assert known_pretraining_tokens(other) == (2 * 10**12, "llama-2-7b")
    unknown = tmp_path / "my-model"
    unknown.mkdir()
    with pytest.raises(GQAConvertError, match="--tokens"):
        budget(unknown)
    expected = (math.ceil(10**10 / (1 << 20)), "0.01 x 1,000,000,000,000 tokens (--original-tokens 1000000000000)")
    assert budget(unknown, fraction=0.01, original_tokens="1T") == expected
    with pytest.raises(GQAConvertError, match="smaller than one optimizer step"):
        budget(unknown, tokens="100")


@pytest.fixture(scope="module")
def trainable(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad") / "model"
    build_trainable(folder, "llama")
    return folder


def _uptrain(model, out, *extra):
    return ["uptrain", str(model), "-o", str(out), "--seq-len", "32", "--tokens", "4096", *map(str, extra)]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "data not found"),
        ("empty", "holds no text to tokenize"),
        ("column", "no column 'text'"),
        ("short", "fewer than one block"),
    ],
)
def test_uptrain_bad_data_writes_nothing(trainable, tmp_path, case, expected):
    data = {
        "missing": tmp_path / "nope.txt",
        "empty": tmp_path / "empty.txt",
        "column": tmp_path / "rows.jsonl",
        "short": tmp_path / "short.txt",
    }[case]
    if case == "empty":
        data.write_text("")
    if case == "column":
        data.write_text('{"content": "hello"}\n{"content": "world"}\n')
    if case == "short":
        data.write_text("a few words")
    out = tmp_path / "out"
    fails(_uptrain(trainable, out, "--data", data), expected)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_uptrain_bad_settings(trainable, tmp_path):
    out = tmp_path / "out"
    fails(_uptrain(trainable, out, "--data", SAMPLE, "--seq-len", 100000), "positions")
    fails(_uptrain(trainable, out, "--data", SAMPLE, "--tokens", 10), "smaller than one optimizer step")
    fails(_uptrain(tmp_path / "nomodel", out, "--data", SAMPLE), "model not found")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    fails(_uptrain(gpt2, out, "--data", SAMPLE), "not supported")
    fails(
        ["uptrain", str(trainable), "-o", str(out), "--data", str(SAMPLE), "--seq-len", "32"], "not known", "--tokens"
    )
    fails(_uptrain(trainable, out, "--data", SAMPLE, "--global-batch-tokens", 1000), "not a multiple")
    fails(
        _uptrain(trainable, out, "--data", SAMPLE, "--mixed-precision", "bf16", "--dry-run", "--measure"), "needs a GPU"
    )
    assert not out.exists()
    out.mkdir()
    (out / "x").write_text("")
    fails(_uptrain(trainable, out, "--data", SAMPLE), "not empty", "--resume")


def test_dry_run_prints_the_plan_and_writes_nothing(trainable, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        _uptrain(
            trainable,
            out,
            "--data",
            SAMPLE,
            "--micro-batch-size",
            2,
            "--grad-accum",
            4,
            "--dry-run",
            "--measure",
            "--json",
        ),
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["global_batch_tokens"] == 2 * 4 * 32 and plan["steps"] == 16 and plan["tokens"] == 4096
    assert plan["processes"] == 1 and plan["measured_step_s"] > 0
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_eval_dtype_auto_and_explicit(model_dir, tmp_path):
    from gqa_convert.evaluation import compute_dtype

    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(half)
    config = AutoConfig.from_pretrained(half)
    assert compute_dtype("auto", config, "cuda") == torch.bfloat16  # what the checkpoint declares, on a GPU
    assert compute_dtype("auto", config, "cpu") == torch.float32
    args = ["eval", str(half), "--data", str(SAMPLE), "--seq-len", "64", "--json"]
    auto = json.loads(runner.invoke(app, args).stdout)
    bf16 = json.loads(runner.invoke(app, [*args, "--dtype", "bfloat16"]).stdout)
    assert auto["dtype"] == "float32" and bf16["dtype"] == "bfloat16" and auto["device"] == "cpu"
    assert bf16["perplexity"] != auto["perplexity"]
    assert bf16["perplexity"] == pytest.approx(auto["perplexity"], rel=0.05)
    from gqa_convert.evaluation import EvalOptions

    with pytest.raises(GQAConvertError, match="--dtype 'int8' is not known"):
        EvalOptions(dtype="int8")
