"""The calibrated merges pinned: the tensors pool writes for each recipe on a tiny model, against those
the code wrote before the recipes existed (tests/data/pinned_merges.json, written by commit a5130c6's
Calibration/--method flags for the same settings). With the torch build and CPU kernels that wrote
them, one CPU thread, every tensor is bit-identical (sha256); elsewhere float rounding may differ, so
their fingerprints (sum, norm, a seeded projection) must agree to 1e-4."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from gqa_convert.surgery.convert import pool
from gqa_convert.surgery.recipes import RECIPES

from helpers import calibrated, save_byte_tokenizer, with_settings
from tiny_models import fit_vocabulary, tiny_config

DATA = Path(__file__).parent / "data"
PINNED = json.loads((DATA / "pinned_merges.json").read_text())
REFINED = dict(steps=3, lr=1e-3)
# case -> (model type, kv heads after, recipe, calibration texts)
CASES = {
    "aligned": ("llama", 1, RECIPES["aligned"], 1),
    "closed-form": ("llama", 2, RECIPES["closed-form"], 1),
    "aligned-averaged-v": ("llama", 1, RECIPES["aligned-averaged-v"], 1),
    "aligned-parallel": ("llama", 2, RECIPES["aligned-not-sequential"], 1),
    "aligned-similarity": ("llama", 2, RECIPES["aligned-similarity"], 1),
    "mean-similarity": ("llama", 2, RECIPES["mean"].replace(grouping="similarity"), 1),
    "aligned-refined": ("llama", 1, with_settings("aligned-refined", refine=REFINED), 1),
    "aligned-refined-attention": ("llama", 1, with_settings("aligned-refined-attention", refine=REFINED), 1),
    "aligned-mixed": ("llama", 1, RECIPES["aligned"], 2),
    "aligned-qwen2": ("qwen2", 1, RECIPES["aligned"], 1),
    "aligned-olmo2": ("olmo2", 1, RECIPES["aligned"], 1),
}


def fingerprint(tensor: torch.Tensor) -> list[float]:
    flat = tensor.double().flatten()
    signs = torch.randint(0, 2, (len(flat),), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    return [float(flat.sum()), float(flat.norm()), float((flat * signs).sum())]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """8 heads, 4 kv heads, a byte-level tokenizer (the same ids on every tokenizers version), std 0.1."""
    folders = {}
    for model_type in ("llama", "qwen2", "olmo2"):
        folder = tmp_path_factory.mktemp("pinned") / model_type
        tokenizer = save_byte_tokenizer(folder)
        torch.manual_seed(0)
        config = tiny_config(
            model_type,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.1)
        fit_vocabulary(model, folder, model_type)  # qwen2's tokenizer class adds a token: one more row
        model.save_pretrained(folder)
        folders[model_type] = folder
    return folders


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pinned tensors were computed on one thread (reductions split differently)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES)
def test_merged_tensors_are_those_pinned_before_the_refactor(case, sources, tmp_path, one_thread):
    model_type, kv_heads, recipe, texts = CASES[case]
    data = (DATA / "calibration.txt", DATA / "technical.txt")[:texts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # olmo2 normalises K: warned about, as it should
        pool(sources[model_type], tmp_path / "out", calibrated(kv_heads, recipe, data, device="cpu"))
    pinned = PINNED["cases"][case]
    same_build = (PINNED["torch"], PINNED["cpu_capability"]) == (
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
    )
    found = {}
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        for name in handle.keys():
            if ".layers." in name and ("attn" in name or "norm" in name):
                found[name] = handle.get_tensor(name)
    assert sorted(found) == sorted(key for key in pinned if key != "groups")
    for name, tensor in found.items():
        assert fingerprint(tensor) == pytest.approx(pinned[name]["fingerprint"], rel=1e-4, abs=1e-6), name
        if same_build:
            digest = hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            assert digest == pinned[name]["sha256"], name
    groups = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())["groups"]
    assert groups == pinned["groups"]
