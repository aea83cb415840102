"""bench: the KV-cache bytes the cache object holds follow the kv head count exactly (the formula of
inspect), for an MHA model and its pooled GQA and MQA versions."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gqa_convert.benchmark import BenchOptions, bench_models
from gqa_convert.cli import app
from gqa_convert.surgery.convert import expand, pool
from gqa_convert.surgery.options import PoolOptions

from tiny_models import HEADS, LAYERS, build_tiny


def test_cache_bytes_follow_the_kv_heads(tmp_path):
    build_tiny(tmp_path / "gqa", "llama")  # 4 heads, 2 kv heads, head_dim 16, float32
    expand(tmp_path / "gqa", tmp_path / "mha")
    pool(tmp_path / "gqa", tmp_path / "mqa", PoolOptions(recipe="mean", kv_heads=1))
    folders = [str(tmp_path / name) for name in ("mha", "gqa", "mqa")]
    results = bench_models(folders, BenchOptions(seq_len=20, batch=2, new_tokens=3))
    assert [r.kv_heads for r in results] == [HEADS, 2, 1]
    for result in results:  # K and V x kv heads x head_dim x layers x 4 bytes x positions x batch
        assert result.cache_tokens == 23 and result.dtype == "float32"
        assert result.cache_bytes == 2 * result.kv_heads * 16 * LAYERS * 4 * 23 * 2
        assert result.decode_tokens_per_s > 0 and result.peak_memory_bytes > 0
    text = CliRunner().invoke(app, ["bench", folders[-1], "--seq-len", "8", "--new-tokens", "2", "--json"]).stdout
    assert [row["kv_heads"] for row in json.loads(text)] == [1]


def test_bench_messages_name_what_bench_was_given(tmp_path):
    """A GGUF is named as bench's input, not as training's; too many positions names both flags."""
    from helpers import fails

    build_tiny(tmp_path / "gqa", "llama", max_position_embeddings=256)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    message = fails(["bench", gguf], "is a GGUF file and bench measures transformers folders", "llama-bench")
    assert "trains" not in message
    message = fails(
        ["bench", tmp_path / "gqa", "--seq-len", 250, "--new-tokens", 20], "--seq-len 250 plus --new-tokens 20"
    )
    assert "is 270 positions, above the model's 256" in message and "--seq-len 270" not in message
    fails(["bench", tmp_path / "gqa", "--seq-len", 300], "--seq-len 300 is above the model's 256 positions")
