"""Calibration text the source model writes itself (the `self` text source, pool's default recipe
aligned-self): sampling checked against full forwards, seeded and bounded generation, the ids kept in
OUT/calibration and reusable as --calib-data, the mix with the user's text, hostile settings and files."""

from __future__ import annotations

import json
import warnings
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
    """Documents of 128 tokens, two to a window of 256: kept as written, and given back as --calib-data
    they fill the windows the same way (whole documents end to end: no warning)."""
    build(tmp_path / "src", chat=True)
    calibration = dict(openings="chat", seed=1, tokens=1024, seq_len=256, document_tokens=128)
    recipe = with_settings("aligned-self", calibration=calibration)
    pool(tmp_path / "src", tmp_path / "a", PoolOptions(kv_heads=1, recipe=recipe))
    kept = tmp_path / "a" / "calibration" / "self_generated.safetensors"
    ids = read_id_file(kept, 320)
    assert ids.shape == (8, 128)
    text = (tmp_path / "a" / "calibration" / "self_generated.txt").read_text()
    assert text.count("----- sequence ") == 8 and text.count("assistant:") == 8
    record = json.loads((tmp_path / "a" / "gqa_convert.json").read_text())
    calibration = record["recipe"]["calibration"]
    assert (calibration["text"], calibration["openings"], calibration["seed"]) == ("self", "chat", 1)
    assert record["calibration"]["kept"] == "calibration/"
    again = PoolOptions(kv_heads=1, recipe="aligned", calib_data=(str(kept),), calib_tokens=1024, calib_seq_len=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
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


def test_the_models_documents_lie_end_to_end_in_the_windows(tmp_path):
    """Each window holds seq_len / document_tokens whole documents, each from its own opening, in the
    order written; a document longer than a window is one window's length."""
    build(tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    bos = Generation(openings="bos", seed=2)
    windows = calibration_ids(checkpoint, CalibrationText("self", (), 128, 32, generation=bos, document_tokens=8))
    documents = self_generate(checkpoint, 16, 8, bos)
    assert windows.shape == (4, 32) and torch.equal(windows, documents.reshape(4, 32))
    start = int(documents[0, 0])
    assert (windows[:, 0::8] == start).all() and not (windows[:, 1:8] == start).all()
    uneven = calibration_ids(checkpoint, CalibrationText("self", (), 96, 32, generation=bos, document_tokens=12))
    assert torch.equal(uneven, self_generate(checkpoint, 8, 12, bos).reshape(-1)[:96].view(3, 32))
    longer = calibration_ids(checkpoint, CalibrationText("self", (), 64, 32, generation=bos, document_tokens=500))
    assert torch.equal(longer, self_generate(checkpoint, 2, 32, bos))


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
        dict(document_tokens=1),
        dict(document_tokens=True),
        dict(document_tokens=64.0),
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


def test_any_temperature_above_zero_draws_and_a_tiny_one_is_the_top_token():
    logits = torch.randn(6, 50) * 30
    for temperature in (1e-300, 1e-45, 1e-30):
        drawn = self_generated._draw(logits, Generation(temperature=temperature), torch.Generator().manual_seed(0))
        assert torch.equal(drawn, logits.argmax(-1)), temperature
    hot = self_generated._draw(logits, Generation(temperature=10, top_p=1e-30), torch.Generator().manual_seed(0))
    assert torch.equal(hot, logits.argmax(-1))  # the smallest nucleus: the top token only


def test_scores_that_are_not_finite_stop_with_one_line():
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(3, 10)
        logits[1, 4] = bad
        with pytest.raises(GQAConvertError, match="not finite"):
            self_generated._draw(logits, Generation(), torch.Generator().manual_seed(0))


def test_draws_follow_the_tempered_distribution_and_its_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    rows = 40_000
    for settings in (Generation(temperature=1.0), Generation(temperature=0.5), Generation(temperature=2.0, top_p=0.8)):
        expected = torch.softmax(logits.double() / settings.temperature, dim=-1)
        if settings.top_p < 1:  # the smallest set of top tokens whose mass reaches top_p, renormalised
            kept = (expected.cumsum(-1) - expected) < settings.top_p  # logits are sorted descending here
            expected = torch.where(kept, expected, 0.0)
            expected /= expected.sum()
        drawn = self_generated._draw(logits.expand(rows, -1), settings, torch.Generator().manual_seed(1))
        frequencies = torch.bincount(drawn, minlength=len(logits)).double() / rows
        sigma = (expected * (1 - expected) / rows).sqrt()
        assert torch.all((frequencies - expected).abs() <= 5 * sigma + 1e-12), (settings, frequencies, expected)
        if settings.top_p < 1:
            assert frequencies[~kept].sum() == 0 and kept.sum() < len(logits)


def test_an_ids_file_of_another_tokenizer_or_sequence_length_is_refused_or_warned(tmp_path):
    build(tmp_path / "src")
    checkpoint = open_checkpoint(tmp_path / "src")
    tokenizer = checkpoint.tokenizer()
    ids = torch.randint(3, 300, (8, 64))
    ours = write_id_file(tmp_path, "ours", ids, tokenizer, {"seed": 0, "openings": "bos"})
    twice = write_id_file(tmp_path, "twice", ids, tokenizer, {"openings": "bos", "seed": 0})
    assert ours.read_bytes() == twice.read_bytes()  # the same ids, the same file
    assert torch.equal(load_file(ours)["input_ids"], ids.int())
    assert torch.equal(read_id_file(ours, 320, tokenizer), ids)
    assert torch.equal(read_id_file(ours, 320, tokenizer, max_tokens=100), ids[:2])  # only the rows needed
    other = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "src")
    other.add_tokens(["<extra>"])  # one token more: a vocabulary of another size
    with pytest.raises(GQAConvertError, match="written for another tokenizer of 321 tokens"):
        read_id_file(write_id_file(tmp_path, "bigger", ids, other, {}), 320, tokenizer)
    renamed = json.loads((tmp_path / "src" / "tokenizer.json").read_text())  # the same size, other tokens
    vocab = renamed["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(renamed))
    swapped = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "other" / "tokenizer.json"))
    assert len(swapped) == len(tokenizer)
    with pytest.raises(GQAConvertError, match="written for another tokenizer than the model's"):
        read_id_file(write_id_file(tmp_path, "swapped", ids, swapped, {}), 320, tokenizer)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ours.read_bytes()[:-5])
    with pytest.raises(GQAConvertError, match="run that conversion again") as raised:
        read_id_file(truncated, 320)
    assert "re-download" not in str(raised.value)
    with pytest.warns(UserWarning, match="sequences of 64 tokens: windows of --calib-seq-len 32 run across them"):
        windows = calibration_ids(checkpoint, CalibrationText("user", (str(ours),), 512, 32))
    assert torch.equal(windows, ids.reshape(-1, 32))
    (tmp_path / "src" / "tokenizer.json").unlink()  # ids need no tokenizer, but then cannot be checked
    with pytest.warns(UserWarning, match="has no tokenizer"):
        calibration_ids(open_checkpoint(tmp_path / "src"), CalibrationText("user", (str(ours),), 512, 64))


def test_openings_that_cannot_start_name_a_fix_that_works(tmp_path, monkeypatch):
    build(tmp_path, chat=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(bos_token=None, eos_token=None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    checkpoint = open_checkpoint(tmp_path)
    tokenizer = checkpoint.tokenizer()
    with pytest.raises(GQAConvertError, match=r"set calibration\.openings to chat in a recipe file"):
        self_generated.OPENINGS["bos"](tokenizer, 2, torch.Generator())
    with pytest.warns(UserWarning, match="the auto openings are all chat openings"):
        auto = self_generated.OPENINGS["auto"](tokenizer, 2, torch.Generator())
    assert auto == self_generated.OPENINGS["chat"](tokenizer, 2, torch.Generator())
    tokenizer.chat_template = None  # neither: no openings at all, so the fix is the user's text
    for openings in ("bos", "chat", "auto"):
        with pytest.raises(GQAConvertError, match=r"calibrate on your text instead \(--recipe aligned"):
            self_generated.OPENINGS[openings](tokenizer, 2, torch.Generator())
    monkeypatch.setattr(self_generated, "source_model", lambda *a: pytest.fail("the model was loaded"))
    chat = open_checkpoint(tmp_path)
    with pytest.raises(
        GQAConvertError,
        match=r"raise --calib-seq-len \(and the .*document_tokens\) above \d+, or set calibration.openings to bos",
    ):
        self_generate(chat, 2, 8, Generation(openings="chat"))  # refused before the model is loaded


def test_the_model_writes_only_its_tokenizers_ids(tmp_path):
    tokenizer = save_tiny_tokenizer(tmp_path)
    padded = tiny_config("llama", vocab_size=len(tokenizer) + 64, max_position_embeddings=256)  # padded rows
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(padded, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer) :] = 50.0  # the padded rows win every draw unless left out
    model.save_pretrained(tmp_path)
    ids = self_generate(open_checkpoint(tmp_path), 3, 16, Generation(openings="bos"))
    assert int(ids.max()) < len(tokenizer)
    small = tiny_config("llama", vocab_size=len(tokenizer) - 20, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(tmp_path / "small")
    save_tiny_tokenizer(tmp_path / "small")
    with pytest.raises(GQAConvertError, match=r"config\.vocab_size"):
        self_generate(open_checkpoint(tmp_path / "small"), 3, 16, Generation(openings="random"))


def test_a_model_too_large_for_the_gpu_names_the_cpu(tmp_path, monkeypatch):
    build(tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    monkeypatch.setattr(self_generated, "_available_bytes", lambda device: 1000 if device.startswith("cuda") else 1e12)
    with pytest.raises(GQAConvertError, match=r"free: write it on the CPU \(--device cpu"):
        source_model(checkpoint, "cuda", torch.bfloat16)
    monkeypatch.setattr(self_generated, "_available_bytes", lambda device: 1000)
    with pytest.raises(GQAConvertError, match="free: calibrate on your text") as raised:
        source_model(checkpoint, "cuda", torch.bfloat16)
    assert "--device cpu" not in str(raised.value)
