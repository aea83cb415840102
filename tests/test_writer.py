"""The streaming sharded writer: shard sizes, names and index as transformers expects them, tensors
read back by the safetensors library itself, raw copies and their fallback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gqa_convert.io.writer import INDEX_NAME, ShardedWriter, TensorSpec


def specs_for(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def write_all(folder, tensors, max_bytes) -> list[str]:
    writer = ShardedWriter(folder, specs_for(tensors), max_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    return writer.finish()


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    assert write_all(tmp_path, tensors, 10**9) == ["model.safetensors"]
    assert not (tmp_path / INDEX_NAME).exists()
    loaded = load_file(tmp_path / "model.safetensors")
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded[name], tensor, atol=0, rtol=0)


def test_shards_respect_the_limit_and_the_index_lists_every_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(10)}  # 256 bytes each
    tensors["big"] = torch.randn(1000)  # 4000 bytes: larger than a shard, gets its own
    files = write_all(tmp_path, tensors, 600)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors" and len(files) == 6
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for file in files:
        loaded = load_file(tmp_path / file)
        size = sum(t.numel() * t.element_size() for t in loaded.values())
        assert size <= 600 or list(loaded) == ["big"]
        for name, tensor in loaded.items():
            assert index["weight_map"][name] == file
            torch.testing.assert_close(tensor, tensors[name], atol=0, rtol=0)


def test_raw_copy_and_its_fallback(tmp_path):
    tensors = {"a": torch.randn(4), "b": torch.randn(4)}
    writer = ShardedWriter(tmp_path, specs_for(tensors), 10**9)
    raw = tensors["a"].numpy().tobytes()
    assert writer.write_raw("a", lambda handle: handle.write(raw) > 0)
    assert not writer.write_raw("b", lambda handle: False)  # the source cannot copy: write the tensor
    writer.write("b", tensors["b"])
    writer.finish()
    loaded = load_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(loaded["a"], tensors["a"], atol=0, rtol=0)
    torch.testing.assert_close(loaded["b"], tensors["b"], atol=0, rtol=0)


def test_order_and_shape_are_checked(tmp_path):
    writer = ShardedWriter(tmp_path, specs_for({"a": torch.zeros(2), "b": torch.zeros(2)}), 10**9)
    with pytest.raises(AssertionError):
        writer.write("b", torch.zeros(2))  # planned order is a, b
    with pytest.raises(AssertionError):
        writer.write("a", torch.zeros(3))
