"""Calibration text the source model writes itself (the `self` text source, pool's default recipe
aligned-self): sampling checked against full forwards, seeded and bounded generation, the ids kept in
OUT/calibration and reusable as --calib-data, the mix with the user's text, hostile settings and files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gqa_convert.calibration import CalibrationSettings, self_generated
from gqa_convert.calibration.id_file import read_id_file, write_id_file
from gqa_convert.calibration.self_generated import Generation, sample, self_generate, source_model
from gqa_convert.calibration.texts import CalibrationText, calibration_ids
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import open_checkpoint
from gqa_convert.surgery.convert import pool
from gqa_convert.surgery.options import PoolOptions

from helpers import SAMPLE, with_settings
from tiny_models import save_tiny_tokenizer, tiny_config

GREEDY = Generation(temperature=1e-4)  # one-hot draws wherever the top two logits differ by more than ~1e-3
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}<s>assistant:"


def build(folder: Path, model_type: str = "llama", chat: bool = False) -> transformers.PreTrainedModel:
    """A tiny model with a real tokenizer (weights at std 0.1: peaked, well separated logits)."""
    tokenizer = save_tiny_tokenizer(folder)
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size=len(tokenizer), max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi"])
def test_sampling_at_a_tiny_temperature_picks_the_full_forwards_top_token(tmp_path, model_type):
    """The oracle: one forward of each whole row, unpadded and without a cache, whose top token at every
    position must be the one drawn (where the top two are not within 2e-3 of each other)."""
    model = build(tmp_path, model_type)
    prompts = [[1], [1, 7, 9, 30], [1, 5]]  # unequal lengths: left padding and per-row positions
    ids = sample(model, prompts, 24, GREEDY, torch.Generator().manual_seed(0))
    assert ids.shape == (3, 24)
    checked = 0
    for row, prompt in zip(ids, prompts):
        assert row[: len(prompt)].tolist() == prompt
        with torch.no_grad():
            logits = model(input_ids=row[None]).logits[0, len(prompt) - 1 : -1]
        top = logits.topk(2, dim=-1)
        clear = top.values[:, 0] - top.values[:, 1] > 2e-3
        assert torch.equal(top.indices[clear, 0], row[len(prompt) :][clear])
        checked += int(clear.sum())
    print(checked)
    assert checked > 0.5 * sum(24 - len(p) for p in prompts)


def test_self_generation_is_seeded_bounded_and_cycles_the_openings(tmp_path, monkeypatch):
    build(tmp_path, chat=True)
    checkpoint = open_checkpoint(tmp_path)
    first = self_generate(checkpoint, 5, 40, Generation(openings="bos", seed=3))
    assert first.shape == (5, 40) and first.dtype == torch.long
    assert torch.equal(first, self_generate(checkpoint, 5, 40, Generation(openings="bos", seed=3)))
    assert not torch.equal(first, self_generate(checkpoint, 5, 40, Generation(openings="bos", seed=4)))
    assert (first[:, 0] == 1).all()  # the tokenizer's <s>
    chats = self_generate(checkpoint, 3, 96, Generation(openings="chat"))
    openings = self_generated.OPENINGS["chat"](checkpoint.tokenizer(), 3, torch.Generator())
    assert len({tuple(opening) for opening in openings}) == 3  # three different requests
    for row, opening in zip(chats, openings):
        assert row[: len(opening)].tolist() == opening
    randoms = self_generate(checkpoint, 6, 16, Generation(openings="random"))
    special = set(checkpoint.tokenizer().all_special_ids)
    assert (randoms[:, 0] == 1).all() and len(set(randoms[:, 1].tolist())) > 3
    assert not special & set(randoms[:, 1].tolist())
    calls = []
    monkeypatch.setattr(self_generated, "KV_CACHE_BYTES", {"cpu": 1, "cuda": 1})  # one sequence per batch
    real_sample = self_generated.sample
    monkeypatch.setattr(
        self_generated,
        "sample",
        lambda model, prompts, *a: calls.append(len(prompts)) or real_sample(model, prompts, *a),
    )
    assert self_generate(checkpoint, 3, 16, Generation(openings="bos")).shape == (3, 16)
    assert calls == [1, 1, 1]


def test_the_generation_model_is_the_source(tmp_path):
    original = build(tmp_path, "qwen2")
    model = source_model(open_checkpoint(tmp_path), "cpu", torch.float32)
    ids = torch.randint(0, original.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_self_generated_calibration_is_kept_and_reusing_it_gives_the_same_merge(tmp_path):
    build(tmp_path / "src", chat=True)
    recipe = with_settings("aligned-self", calibration=dict(openings="chat", seed=1, tokens=1024, seq_len=128))
    pool(tmp_path / "src", tmp_path / "a", PoolOptions(kv_heads=1, recipe=recipe))
    kept = tmp_path / "a" / "calibration" / "self_generated.safetensors"
    ids = read_id_file(kept, 320)
    assert ids.shape == (8, 128)
    text = (tmp_path / "a" / "calibration" / "self_generated.txt").read_text()
    assert text.count("----- sequence ") == 8 and "assistant:" in text
    record = json.loads((tmp_path / "a" / "gqa_convert.json").read_text())
    calibration = record["recipe"]["calibration"]
    assert (calibration["text"], calibration["openings"], calibration["seed"]) == ("self", "chat", 1)
    assert record["calibration"]["kept"] == "calibration/"
    again = PoolOptions(kv_heads=1, recipe="aligned", calib_data=(str(kept),), calib_tokens=1024, calib_seq_len=128)
    pool(tmp_path / "src", tmp_path / "b", again)
    merged_a, merged_b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert merged_a.keys() == merged_b.keys()
    for name in merged_a:
        assert torch.equal(merged_a[name], merged_b[name]), name
    assert not (tmp_path / "b" / "calibration").exists()  # nothing generated, nothing kept


def test_the_default_recipe_writes_its_own_text_and_a_fused_architecture_falls_back_with_a_warning(tmp_path):
    build(tmp_path / "src")
    pool(tmp_path / "src", tmp_path / "out", PoolOptions(kv_heads=1, calib_tokens=512, calib_seq_len=64))
    record = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())
    assert record["recipe"]["name"] == "aligned-self" and (tmp_path / "out" / "calibration").is_dir()
    options = PoolOptions(kv_heads=1)
    with pytest.warns(UserWarning, match="fuses them: recipe mean instead"):
        fallback = options.for_architecture(_fused(tmp_path / "src"))
    assert fallback.resolved_recipe.name == "mean"
    assert PoolOptions(kv_heads=1, recipe="aligned-self").for_architecture(_fused(tmp_path / "src")).recipe.name == (
        "aligned-self"
    )  # a recipe the user named is never replaced: its run refuses the architecture instead


def _fused(folder: Path):
    import dataclasses

    return dataclasses.replace(open_checkpoint(folder).architecture, projections=None)


def test_mixed_calibration_shares_the_tokens_with_the_generated_text(tmp_path):
    build(tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    ids = calibration_ids(checkpoint, CalibrationText("self", (str(SAMPLE),), 256, 32))
    text = calibration_ids(checkpoint, CalibrationText("user", (str(SAMPLE),), 128, 32))
    generated = self_generate(checkpoint, 4, 32, Generation())
    assert ids.shape == (8, 32)
    assert torch.equal(ids[0::2], text) and torch.equal(ids[1::2], generated)  # interleaved, half each


def test_generation_settings_are_checked():
    for bad in (
        dict(temperature=0.0),
        dict(temperature=float("nan")),
        dict(temperature=True),
        dict(top_p=1.5),
        dict(top_p=0.0),
        dict(seed=-1),
        dict(seed=1.5),
        dict(openings="poem"),
    ):
        with pytest.raises(GQAConvertError):
            CalibrationSettings(text="self", **bad)
    with pytest.raises(GQAConvertError, match="--calib-data"):
        PoolOptions(kv_heads=1, recipe="aligned")


def test_a_model_that_cannot_fit_or_has_no_chat_template_is_refused_with_the_fix(tmp_path, monkeypatch):
    build(tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    with pytest.raises(GQAConvertError, match="chat template"):
        self_generate(checkpoint, 1, 16, Generation(openings="chat"))
    auto = self_generated.OPENINGS["auto"](checkpoint.tokenizer(), 4, torch.Generator())
    assert all(len(opening) == 2 and opening[0] == 1 for opening in auto)  # no template: the random openings
    monkeypatch.setattr(self_generated, "_available_bytes", lambda device: 1000)
    with pytest.raises(GQAConvertError, match="--recipe mean"):
        self_generate(checkpoint, 1, 16, Generation())


def test_a_tampered_ids_file_is_refused(tmp_path):
    tokenizer = save_tiny_tokenizer(tmp_path)
    good = write_id_file(tmp_path, "ids", torch.randint(0, 320, (3, 16)), tokenizer, {"why": "test"})
    assert read_id_file(good, 320).shape == (3, 16)
    with pytest.raises(GQAConvertError, match="vocabulary"):
        read_id_file(good, 100)  # written for a larger vocabulary
    cases = {
        "float": ({"input_ids": torch.zeros(2, 4)}, {"format": "gqa-convert calibration ids", "format_version": "1"}),
        "1-D": (
            {"input_ids": torch.zeros(4, dtype=torch.int32)},
            {"format": "gqa-convert calibration ids", "format_version": "1"},
        ),
        "negative": (
            {"input_ids": -torch.ones(2, 4, dtype=torch.int32)},
            {"format": "gqa-convert calibration ids", "format_version": "1"},
        ),
        "no format": ({"input_ids": torch.zeros(2, 4, dtype=torch.int32)}, {}),
        "version": (
            {"input_ids": torch.zeros(2, 4, dtype=torch.int32)},
            {"format": "gqa-convert calibration ids", "format_version": "9"},
        ),
        "two tensors": (
            {"input_ids": torch.zeros(2, 4, dtype=torch.int32), "x": torch.zeros(1)},
            {"format": "gqa-convert calibration ids", "format_version": "1"},
        ),
    }
    for name, (tensors, metadata) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(GQAConvertError):
            read_id_file(path, 320)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(GQAConvertError, match=r"truncated|corrupt"):
        read_id_file(truncated, 320)
