"""Outputs checked against independent clients: transformers 4.57 (in a subprocess, from an overlay
fetched by scripts/setup_clients.sh) loads the same model, tokenizer and chat template as transformers
5; llama.cpp's convert_hf_to_gguf.py converts outputs of both source kinds (GGUF and folder), the
folder one exactly. Skipped, with the reason, where the clients could not be fetched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from gqa_convert.io.gguf_header import read_gguf_header
from gqa_convert.io.portable import causal_lm_architecture
from gqa_convert.surgery.convert import pool
from gqa_convert.surgery.options import PoolOptions

from real_model import smollm2_gguf
from tiny_models import TINY, build_tiny, build_trainable, tiny_config

CLIENTS = Path(os.environ.get("GQA_CLIENTS", Path(sys.prefix) / "clients"))
MESSAGES = [{"role": "user", "content": "What is grouped-query attention?"}]
TEXT = "Grouped-query attention shares keys and values: héllo wörld 🙂 <|im_end|> 3.14"

# Runs under transformers 4.57: prints what it loaded as JSON.
PROBE_457 = r"""
import json, sys, torch, transformers
transformers.logging.set_verbosity_error()
folder, text, messages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = transformers.AutoConfig.from_pretrained(folder)
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
ids = tokenizer(text)["input_ids"]
chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if tokenizer.chat_template else None
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0, :, :64].tolist()
print(json.dumps({"version": transformers.__version__, "architectures": config.architectures,
                  "rope_theta": getattr(config, "rope_theta", None), "ids": ids, "chat": chat, "logits": logits}))
"""


def client(name: str) -> Path:
    path = CLIENTS / name
    if not (path / ".complete").exists():
        pytest.skip(f"{name} was not fetched into {CLIENTS} (scripts/setup_clients.sh needs PyPI)")
    return path


def in_transformers_457(folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(client("transformers-4.57"))}
    command = [sys.executable, "-c", PROBE_457, str(folder), TEXT, json.dumps(MESSAGES)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def in_transformers_5(folder: Path) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :, :64]
    chat = None
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return {"ids": ids, "chat": chat, "logits": logits}


def convert_with_llama_cpp(folder: Path, out: Path, *extra: str, overlay: Path | None = None) -> None:
    converter = client("llama.cpp")
    paths = [str(overlay)] if overlay else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(converter / "gguf-py")])}
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def gguf_mqa(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "mqa"
    pool(smollm2_gguf(), out, PoolOptions(recipe="mean", kv_heads=1))
    return out


@pytest.fixture(scope="module")
def folder_mqa(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("tiny") / "src"
    build_trainable(source)
    pool(source, source.with_name("mqa"), PoolOptions(recipe="mean", kv_heads=1))
    return source.with_name("mqa")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gguf_mqa", "folder_mqa"])
def test_transformers_457_loads_the_same_model(name, request):
    folder = request.getfixturevalue(name)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [causal_lm_architecture(config["model_type"])]
    old, new = in_transformers_457(folder), in_transformers_5(folder)
    assert old["version"].startswith("4.57") and old["architectures"] == config["architectures"]
    assert old["rope_theta"] == config["rope_parameters"]["rope_theta"]  # 4.57 would default to 1e4
    assert old["ids"] == new["ids"] and old["chat"] == new["chat"]
    torch.testing.assert_close(torch.tensor(old["logits"]), new["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("with_457", [False, True])
def test_llama_cpp_reads_the_gguf_derived_output(tmp_path, gguf_mqa, with_457):
    """--vocab-only: the converter reads config and tokenizer and writes the hyper-parameters."""
    overlay = client("transformers-4.57") if with_457 else None
    convert_with_llama_cpp(gguf_mqa, tmp_path / "vocab.gguf", "--vocab-only", overlay=overlay)
    meta, _ = read_gguf_header(tmp_path / "vocab.gguf")
    assert meta["llama.attention.head_count_kv"] == 1 and meta["llama.attention.head_count"] == 9
    assert meta["llama.rope.freq_base"] == 100000.0
    assert meta["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.slow
def test_llama_cpp_converts_the_gguf_derived_mqa_exactly(tmp_path, gguf_mqa):
    """The whole real model: every tensor converted (f32), and read back, the same logits."""
    convert_with_llama_cpp(gguf_mqa, tmp_path / "mqa.gguf", "--outtype", "f32")
    meta, tensors = read_gguf_header(tmp_path / "mqa.gguf")
    assert meta["llama.attention.head_count_kv"] == 1 and len(tensors) == 272  # 30 layers x 9 + embedding, norm
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mqa.gguf", dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(gguf_mqa, dtype=torch.float32)
    ids = torch.randint(3, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_llama_cpp_converts_a_folder_derived_mqa_exactly(tmp_path, gguf_mqa):
    """llama.cpp recognises a BPE tokenizer by hashing its ids on a fixed text, so the tiny model
    borrows SmolLM2's tokenizer files; no attention bias (transformers' GGUF reader drops biases)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (source / name).write_bytes((gguf_mqa / name).read_bytes())
    torch.manual_seed(0)
    config = tiny_config(
        "llama", vocab_size=49152, rope_theta=100000.0, attention_bias=False, max_position_embeddings=256
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    model.save_pretrained(source)
    pool(source, tmp_path / "mqa", PoolOptions(recipe="mean", kv_heads=1))
    convert_with_llama_cpp(tmp_path / "mqa", tmp_path / "mqa.gguf", "--outtype", "f32")
    meta, _ = read_gguf_header(tmp_path / "mqa.gguf")
    assert (meta["llama.attention.head_count_kv"], meta["llama.attention.head_count"]) == (1, 4)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mqa.gguf", dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mqa", dtype=torch.float32)
    ids = torch.randint(3, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)


# Non-default rope settings, so that a config 4.57 misreads gives other logits.
ROPE_CASES = {model_type: {"rope_theta": 123456.0} for model_type in TINY if model_type != "gemma3_text"}
ROPE_CASES["phi"] = {"rope_theta": 123456.0, "partial_rotary_factor": 0.75, "qk_layernorm": True}
ROPE_CASES["stablelm"] = {"rope_theta": 123456.0, "partial_rotary_factor": 0.5, "qk_layernorm": True}
ROPE_CASES["gemma3_text"] = {
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 12345.0},
    },
    "sliding_window": 8,
}
ROPE_CASES["llama:llama3"] = {
    "rope_parameters": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 500000.0,
    }
}
ROPE_CASES["qwen2:yarn"] = {
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 7e4}
}

# Runs under transformers 4.57: the largest logit difference of each folder against transformers 5's.
COMPARE_457 = r"""
import json, sys, torch, transformers
transformers.logging.set_verbosity_error()
ids = torch.load(sys.argv[1])
result = {}
for folder, reference in json.loads(sys.argv[2]).items():
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = (model.eval()(input_ids=ids).logits - torch.load(reference["logits"])).abs().max().item()
    result[folder] = {"logits": logits}
print(json.dumps(result))
"""


@pytest.mark.slow
def test_every_architecture_pooled_reads_the_same_in_transformers_457(tmp_path):
    """Each architecture, with rope settings 4.57 would misread from a transformers-5 config, pooled to
    MQA: transformers 4.57 computes the same logits as transformers 5."""
    overlay = client("transformers-4.57")
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    references = {}
    for case, overrides in ROPE_CASES.items():
        source, out = tmp_path / case / "src", tmp_path / case / "mqa"
        build_tiny(source, case.split(":")[0], **overrides)
        pool(source, out, PoolOptions(recipe="mean", kv_heads=1))
        model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, tmp_path / case / "logits.pt")
        references[str(out)] = {"logits": str(tmp_path / case / "logits.pt")}
    command = [sys.executable, "-c", COMPARE_457, str(tmp_path / "ids.pt"), json.dumps(references)]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(overlay)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    read = json.loads(done.stdout.splitlines()[-1])
    assert len(read) == len(ROPE_CASES)
    for folder, seen in read.items():  # exactly equal; a misread rope moves them by 1e-5 or more
        assert seen["logits"] < 1e-6, (folder, seen["logits"])
