"""Bad input: one clear line on stderr, exit code 2, no traceback, and nothing lost or half-written."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from gqa_convert.cli import app

from helpers import fails, runner
from tiny_models import build_tiny, load, logits


@pytest.mark.parametrize(
    "kv_heads, expected",
    [(3, "choose one of 1, 2"), (0, "--kv-heads must be at least 1"), (-1, "at least 1"), (5, "1, 2"), (4, "1, 2")],
)
def test_kv_heads_that_do_not_divide_list_the_valid_values(src, tmp_path, kv_heads, expected):
    fails(["pool", src, "-o", tmp_path / "out", "--kv-heads", kv_heads, "--recipe", "mean"], expected)
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path):
    fails(["pool", tmp_path / "nope", "-o", tmp_path / "out", "--kv-heads", 1, "--recipe", "mean"], "source not found")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    fails(["pool", tmp_path / "empty", "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"], "no config.json")


def test_invalid_config_json(src, tmp_path):
    (src / "config.json").write_text("{ not json")
    fails(["inspect", src], "config.json is not valid JSON")


def test_truncated_safetensors(src, tmp_path):
    weights = src / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    fails(["pool", src, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"], "truncated", "re-download")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_header(src, tmp_path):
    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12
    weights.write_bytes(bytes(data))
    fails(["inspect", src], "corrupt header")


@pytest.mark.parametrize(
    "model_type, config_class, reason",
    [
        ("gpt2", "GPT2Config", "no kv head count"),
        ("gpt_neox", "GPTNeoXConfig", "no kv head count"),
        ("opt", "OPTConfig", "no kv head count"),
        ("deepseek_v2", "DeepseekV2Config", "multi-head latent attention"),
    ],
)
def test_unsupported_architecture_is_named_with_the_reason(tmp_path, model_type, config_class, reason):
    import transformers

    folder = tmp_path / model_type
    folder.mkdir()
    getattr(transformers, config_class)().to_json_file(folder / "config.json")
    fails(
        ["pool", folder, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"],
        f"'{model_type}' is not supported",
        reason,
    )


def test_output_inside_or_equal_to_source(src):
    fails(["pool", src, "-o", src, "-g", 1, "--recipe", "mean"], "is the input")
    fails(["pool", src, "-o", src / "sub", "-g", 1, "--recipe", "mean"], "inside the input folder")
    assert not (src / "sub").exists()


def test_non_empty_output_is_refused_and_force_replaces_only_what_this_tool_wrote(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(["pool", src, "-o", out, "-g", 1, "--recipe", "mean"], "not empty", "--force")
    fails(["pool", src, "-o", out, "-g", 1, "--recipe", "mean", "--force"], "did not write", "choose a new folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert runner.invoke(app, ["pool", str(src), "-o", str(ours), "-g", "1", "--recipe", "mean"]).exit_code == 0
    fails(["pool", src, "-o", ours, "-g", 2, "--recipe", "mean"], "not empty", "--force")
    result = runner.invoke(app, ["pool", str(src), "-o", str(ours), "-g", "2", "--recipe", "mean", "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((ours / "config.json").read_text())["num_key_value_heads"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out", "src"]  # no staging or lock left


def test_pickle_weights_need_allow_pickle(tmp_path):
    model = build_tiny(tmp_path / "safe", "llama")
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
    state = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_word_embeddings
    }
    torch.save(state, folder / "pytorch_model.bin")
    fails(["pool", folder, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"], "--allow-pickle")
    result = runner.invoke(
        app, ["pool", str(folder), "-o", str(tmp_path / "out"), "-g", "2", "--recipe", "mean", "--allow-pickle"]
    )
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(model))


def test_hub_id_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(["pool", "some-org/some-model", "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"], "HF_HUB_OFFLINE")


def test_unknown_max_shard_size(src, tmp_path):
    fails(["pool", src, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean", "--max-shard-size", "lots"], "size 'lots'")


def test_full_disk_leaves_no_half_folder(src, tmp_path):
    """The write limit (RLIMIT_FSIZE) makes the kernel refuse bytes past 64 KiB, as a full disk would."""
    out = tmp_path / "out"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    process = subprocess.run(
        [sys.executable, "-m", "gqa_convert.cli", "pool", str(src), "-o", str(out), "-g", "1", "--recipe", "mean"],
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 2, process.stderr
    assert "no space left" in process.stderr and "Traceback" not in process.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_sharded_output_has_index_and_loads(src, tmp_path):
    model = load(src)
    result = runner.invoke(
        app, ["pool", str(src), "-o", str(tmp_path / "out"), "-g", "2", "--recipe", "mean", "--max-shard-size", "20KB"]
    )
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    stored = {}
    for shard in shards:
        stored.update(load_file(tmp_path / "out" / shard))
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(model))
