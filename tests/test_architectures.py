"""Every supported architecture, on a tiny random model: expand is exact, expand-then-pool gives the
original logits back, and pooled weights equal a mean computed here from the loaded model's modules."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gqa_convert.surgery.convert import expand, pool
from gqa_convert.surgery.options import PoolOptions

from tiny_models import HEADS, KV_HEADS, TINY, build_tiny, load, logits


def kv_heads(model, layer: int) -> dict[str, torch.Tensor]:
    """Every kv-dependent tensor of a layer as stacked heads (nkv, ...), read from the model's own
    modules with this file's knowledge of each layout (independent of gqa_convert's table)."""
    config = model.config
    nh = config.num_attention_heads
    if config.model_type == "falcon":
        hd = config.hidden_size // nh
        attention = model.transformer.h[layer].self_attention
        out = {}
        for param in ("weight", "bias"):
            w = getattr(attention.query_key_value, param)
            if w is None:
                continue
            if config.new_decoder_architecture:
                grouped = w.reshape(config.num_kv_heads, nh // config.num_kv_heads + 2, hd, *w.shape[1:])
                out[f"k.{param}"], out[f"v.{param}"] = grouped[:, -2], grouped[:, -1]
            elif config.multi_query:
                heads = w.reshape(nh + 2, hd, *w.shape[1:])
                out[f"k.{param}"], out[f"v.{param}"] = heads[nh : nh + 1], heads[nh + 1 :]
            else:
                heads = w.reshape(nh, 3, hd, *w.shape[1:])
                out[f"k.{param}"], out[f"v.{param}"] = heads[:, 1], heads[:, 2]
        return out
    attention = model.model.layers[layer].self_attn
    nkv = config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // nh
    if config.model_type == "phi3":
        w = attention.qkv_proj.weight
        _, k, v = w.split([nh * hd, nkv * hd, nkv * hd])
        return {"k": k.reshape(nkv, hd, -1), "v": v.reshape(nkv, hd, -1)}
    out = {}
    for name in ("k_proj", "v_proj"):
        module = getattr(attention, name)
        out[name] = module.weight.reshape(nkv, hd, -1)
        if module.bias is not None:
            out[name + ".bias"] = module.bias.reshape(nkv, hd)
    if config.model_type in ("olmo2", "cohere"):
        out["k_norm"] = attention.k_norm.weight.reshape(nkv, hd)
    if config.model_type == "stablelm":
        out["k_layernorm"] = torch.stack([norm.weight for norm in attention.k_layernorm.norms])
    return out


def kv_tensor_names(model) -> set[str]:
    keys = ("k_proj", "v_proj", "qkv_proj", "query_key_value", "k_norm", "k_layernorm")
    return {name for name in model.state_dict() if any(key in name for key in keys)}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_expand_then_pool_back_reproduces_logits(tmp_path, model_type):
    original = build_tiny(tmp_path / "src", model_type)
    reference = logits(original)

    expand(tmp_path / "src", tmp_path / "mha")
    mha = load(tmp_path / "mha")
    assert len(kv_heads(mha, 0)) > 0 and next(iter(kv_heads(mha, 0).values())).shape[0] == HEADS
    torch.testing.assert_close(logits(mha), reference, atol=1e-4, rtol=1e-4)

    pool(tmp_path / "mha", tmp_path / "back", PoolOptions(recipe="mean", kv_heads=KV_HEADS))
    back = load(tmp_path / "back")
    torch.testing.assert_close(logits(back), reference, atol=1e-4, rtol=1e-4)
    for layer in range(2):
        for key, heads in kv_heads(original, layer).items():
            torch.testing.assert_close(kv_heads(back, layer)[key], heads, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_pool_to_mqa_equals_independent_mean(tmp_path, model_type):
    original = build_tiny(tmp_path / "src", model_type)
    pool(tmp_path / "src", tmp_path / "mqa", PoolOptions(recipe="mean", kv_heads=1))
    mqa = load(tmp_path / "mqa")  # stock transformers, no help from us
    assert torch.isfinite(logits(mqa)).all()
    for layer in range(2):
        pooled = kv_heads(mqa, layer)
        expected = kv_heads(original, layer)
        assert set(pooled) == set(expected)
        for key, heads in expected.items():
            assert pooled[key].shape[0] == 1
            torch.testing.assert_close(pooled[key], heads.mean(0, keepdim=True), atol=1e-6, rtol=1e-6)
    # everything that does not depend on the kv count is copied unchanged
    converted = mqa.state_dict()
    for name, tensor in original.state_dict().items():
        if name not in kv_tensor_names(original):
            torch.testing.assert_close(converted[name], tensor, atol=0, rtol=0)


def test_falcon_old_mqa_layout_expands_and_pools_back_exactly(tmp_path):
    original = build_tiny(
        tmp_path / "src", "falcon", new_decoder_architecture=False, multi_query=True, parallel_attn=True
    )
    reference = logits(original)
    expand(tmp_path / "src", tmp_path / "mha")
    mha = load(tmp_path / "mha")
    assert not mha.config.multi_query and not mha.config.new_decoder_architecture
    torch.testing.assert_close(logits(mha), reference, atol=1e-4, rtol=1e-4)
    pool(tmp_path / "mha", tmp_path / "back", PoolOptions(recipe="mean", kv_heads=1))
    back = load(tmp_path / "back")
    assert back.config.multi_query
    torch.testing.assert_close(logits(back), reference, atol=1e-4, rtol=1e-4)


def test_falcon_old_mha_layout_becomes_new_decoder_gqa(tmp_path):
    original = build_tiny(
        tmp_path / "src",
        "falcon",
        new_decoder_architecture=False,
        multi_query=False,
        parallel_attn=True,
        num_kv_heads=HEADS,
    )
    pool(tmp_path / "src", tmp_path / "gqa", PoolOptions(recipe="mean", kv_heads=2))
    gqa = load(tmp_path / "gqa")
    assert gqa.config.new_decoder_architecture and gqa.config.num_kv_heads == 2
    assert torch.isfinite(logits(gqa)).all()
    expected = kv_heads(original, 0)
    for key, heads in kv_heads(gqa, 0).items():
        torch.testing.assert_close(heads, expected[key].reshape(2, 2, *heads.shape[1:]).mean(1))
    # and back: expand of that GQA then pool gives the GQA's logits again
    expand(tmp_path / "gqa", tmp_path / "mha")
    pool(tmp_path / "mha", tmp_path / "gqa2", PoolOptions(recipe="mean", kv_heads=2))
    torch.testing.assert_close(logits(load(tmp_path / "gqa2")), logits(gqa), atol=1e-4, rtol=1e-4)


KV_FIELDS = ("num_key_value_heads", "num_kv_heads")  # the spellings of a kv count in transformers' configs
FALCON_LAYOUTS = [
    ("falcon", dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True)),
    ("falcon", dict(new_decoder_architecture=False, multi_query=False, parallel_attn=True, num_kv_heads=HEADS)),
]


def cached_kv_heads(model) -> int:
    """The kv heads transformers caches (what a user's memory pays for): one forward with a cache."""
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True).past_key_values
    keys = cache.layers[0].keys if hasattr(cache, "layers") else cache[0][0]
    return keys.shape[1]


@pytest.mark.parametrize(
    "model_type, overrides", [(m, {}) for m in sorted(TINY)] + FALCON_LAYOUTS, ids=lambda v: str(v or "")
)
def test_every_kv_count_field_agrees_after_pool_and_expand(tmp_path, model_type, overrides):
    """The written config.json, the config transformers loads and the cache it allocates all hold the
    new kv count: no field keeps the source's (Falcon carries two spellings)."""
    from gqa_convert.arch import ARCHITECTURES

    assert set(TINY) == set(ARCHITECTURES)  # every row of the table is tried here
    build_tiny(tmp_path / "src", model_type, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an old-layout MQA Falcon is already at one kv head
        pool(tmp_path / "src", tmp_path / "pooled", PoolOptions(recipe="mean", kv_heads=1))
        expand(tmp_path / "src", tmp_path / "expanded")
    for folder, kv in ((tmp_path / "pooled", 1), (tmp_path / "expanded", HEADS)):
        raw = json.loads((folder / "config.json").read_text())
        written = {name: raw[name] for name in KV_FIELDS if name in raw}
        assert written and set(written.values()) == {kv}, (folder.name, written)
        if raw.get("multi_query") and not raw.get("new_decoder_architecture"):
            assert kv == 1, raw
        model = load(folder)
        loaded = {name: getattr(model.config, name) for name in KV_FIELDS if getattr(model.config, name, None)}
        assert set(loaded.values()) == {kv}, (folder.name, loaded)
        assert cached_kv_heads(model) == kv
