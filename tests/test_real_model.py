"""End to end on the real SmolLM2-135M GGUF (Llama, 9 heads, 3 kv heads)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from gqa_convert.data.text import tokenize_text
from gqa_convert.evaluation import perplexity_of
from gqa_convert.surgery.convert import expand, pool
from gqa_convert.surgery.options import PoolOptions

from real_model import SAMPLE_TEXT, smollm2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def mha_folder(gguf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2") / "mha"
    expand(gguf, folder)
    return folder


@pytest.fixture(scope="module")
def original(gguf):
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def test_pool_gguf_to_mqa_loads_and_generates(tmp_path, gguf):
    pool(gguf, tmp_path / "mqa", PoolOptions(recipe="mean", kv_heads=1, dtype="bfloat16"))
    assert json.loads((tmp_path / "mqa" / "config.json").read_text())["num_key_value_heads"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mqa")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "mqa")
    assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == 1
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) > 0 and tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_expand_then_pool_back_reproduces_perplexity(tmp_path, mha_folder, original):
    model, tokenizer = original
    ids = tokenize_text(tokenizer, SAMPLE_TEXT.read_text())
    reference = perplexity_of(model, ids, seq_len=256)
    assert 2 < reference["perplexity"] < 200  # a real model on plain English

    mha = AutoModelForCausalLM.from_pretrained(mha_folder, dtype=torch.float32)
    assert mha.config.num_key_value_heads == 9
    pool(mha_folder, tmp_path / "gqa3", PoolOptions(recipe="mean", kv_heads=3))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gqa3", dtype=torch.float32)
    assert back.config.num_key_value_heads == 3
    for converted in (mha, back):
        result = perplexity_of(converted, ids, seq_len=256)
        assert result["tokens"] == reference["tokens"]
        assert result["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    # the tokenizer travels with the weights
    assert AutoTokenizer.from_pretrained(tmp_path / "gqa3")("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_mean_pooling_to_mqa_costs_quality_on_the_real_model(tmp_path, mha_folder, original):
    """Not exact: the paper's rule hurts a trained model (why uptraining exists). A pool that did
    nothing, or a broken one, would fail one of the two bounds."""
    model, tokenizer = original
    ids = tokenize_text(tokenizer, SAMPLE_TEXT.read_text())
    reference = perplexity_of(model, ids, seq_len=256)["perplexity"]
    pool(
        mha_folder, tmp_path / "mqa", PoolOptions(recipe="mean", kv_heads=1)
    )  # MHA-9 -> MQA: the 3 original heads, each thrice
    mqa = AutoModelForCausalLM.from_pretrained(tmp_path / "mqa", dtype=torch.float32)
    pooled = perplexity_of(mqa, ids, seq_len=256)["perplexity"]
    assert pooled > 2 * reference
    assert torch.isfinite(torch.tensor(pooled))


def test_aligned_merge_beats_mean_pooling_on_held_out_text(tmp_path, mha_folder):
    """Calibrated on the first 60% of the sample, measured on the rest: aligned must be far better."""
    text = SAMPLE_TEXT.read_text()
    cut = text.index("\n", int(len(text) * 0.6)) + 1
    (tmp_path / "calib.txt").write_text(text[:cut])
    (tmp_path / "heldout.txt").write_text(text[cut:])
    calibration = dict(calib_data=(str(tmp_path / "calib.txt"),), calib_tokens=288, calib_seq_len=96)
    pool(mha_folder, tmp_path / "aligned", PoolOptions(kv_heads=1, recipe="aligned", **calibration))
    pool(mha_folder, tmp_path / "mean", PoolOptions(recipe="mean", kv_heads=1))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "aligned")
    ids = tokenize_text(tokenizer, (tmp_path / "heldout.txt").read_text())
    scores = {
        name: perplexity_of(
            AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32), ids, seq_len=128
        )["perplexity"]
        for name in ("aligned", "mean")
    }
    assert scores["aligned"] * 10 < scores["mean"], scores


def test_inspect_reads_the_gguf_header_only_and_agrees_with_transformers(gguf, tmp_path):
    from gqa_convert.errors import GQAConvertError
    from gqa_convert.inspection import inspect_checkpoint
    from gqa_convert.io.gguf_header import gguf_metadata

    report = inspect_checkpoint(gguf)
    from transformers import AutoConfig

    reference = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert (report["layers"], report["num_attention_heads"], report["num_key_value_heads"]) == (
        reference.num_hidden_layers,
        reference.num_attention_heads,
        reference.num_key_value_heads,
    )
    assert report["head_dim"] == reference.head_dim and report["hidden_size"] == reference.hidden_size
    assert report["dtype"] == "gguf Q4_1" and 134e6 < report["parameters"] < 135e6
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf.read_bytes()[:5000])
    with pytest.raises(GQAConvertError, match="truncated or corrupt GGUF header"):
        gguf_metadata(truncated)


def test_eval_reads_the_gguf_file_itself(gguf, original):
    """eval of an existing .gguf file (once "model not found") equals perplexity on transformers' own load."""
    from typer.testing import CliRunner

    from gqa_convert.cli import app

    model, tokenizer = original
    args = ["eval", str(gguf), "--data", str(SAMPLE_TEXT), "--seq-len", "64", "--max-tokens", "256", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = perplexity_of(model, tokenize_text(tokenizer, SAMPLE_TEXT.read_text(), max_tokens=256), seq_len=64)
    reported = json.loads(result.stdout)
    assert reported["tokens"] == expected["tokens"]
    assert reported["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
