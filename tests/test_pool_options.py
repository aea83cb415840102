"""Methods, dtypes, provenance, model card and inspect on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from gqa_convert.cli import app
from gqa_convert.inspection import InspectOptions, inspect_checkpoint
from gqa_convert.surgery.convert import pool
from gqa_convert.surgery.options import PoolOptions
from gqa_convert.surgery.recipes import RECIPES

from tiny_models import build_tiny, load

runner = CliRunner()


def k_heads(model, layer=0):
    attention = model.model.layers[layer].self_attn
    hd = model.config.head_dim
    return attention.k_proj.weight.reshape(-1, hd, model.config.hidden_size)


def test_first_keeps_each_groups_first_head(tmp_path):
    model = build_tiny(tmp_path / "src", "llama")
    pool(tmp_path / "src", tmp_path / "out", PoolOptions(kv_heads=1, method="first"))
    pooled = load(tmp_path / "out")
    torch.testing.assert_close(k_heads(pooled), k_heads(model)[:1], atol=0, rtol=0)
    bias = pooled.model.layers[0].self_attn.v_proj.bias
    torch.testing.assert_close(bias, model.model.layers[0].self_attn.v_proj.bias[: bias.numel()])


def test_random_is_seeded_fresh_and_scaled_like_init(tmp_path):
    model = build_tiny(tmp_path / "src", "llama", num_attention_heads=8, num_key_value_heads=8, hidden_size=256)
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        pool(tmp_path / "src", tmp_path / name, PoolOptions(kv_heads=2, method="random", seed=seed))
    a, b, c = (k_heads(load(tmp_path / n)) for n in "abc")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # each group its own draw
    assert a.std().item() == pytest.approx(model.config.initializer_range, rel=0.1)
    assert torch.count_nonzero(load(tmp_path / "a").model.layers[0].self_attn.k_proj.bias) == 0


def test_dtype_casts_floating_tensors_and_config(tmp_path):
    build_tiny(tmp_path / "src", "qwen2")
    pool(tmp_path / "src", tmp_path / "out", PoolOptions(recipe="mean", kv_heads=1, dtype="bfloat16"))
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load(tmp_path / "out").config.num_key_value_heads == 1


def test_provenance_and_model_card(tmp_path):
    build_tiny(tmp_path / "src", "mistral")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    pool(tmp_path / "src", tmp_path / "out", PoolOptions(recipe="mean", kv_heads=1))
    record = json.loads((tmp_path / "out" / "gqa_convert.json").read_text())
    assert record["tool"] == "gqa-convert" and record["method"] == "mean" and record["groups"] == [[0, 1]]
    assert record["kv_heads_before"] == 2 and record["kv_heads_after"] == 1 and record["version"]
    assert record["recipe"] == RECIPES["mean"].as_dict() and record["recipe"]["name"] == "mean"
    assert "calibration" not in record  # nothing calibrated
    card = (tmp_path / "out" / "README.md").read_text()
    assert "recipe `mean`" in card
    assert card.startswith("---\nbase_model: src\n") and "- grouped-query-attention" in card
    assert (tmp_path / "out" / "tokenizer_config.json").exists()  # other non-weight files travel
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1


def test_explicit_kv_attribute_where_the_class_default_differs(tmp_path):
    """Olmo's class falls back to nh when the attribute is absent; the output must say 1 explicitly."""
    build_tiny(tmp_path / "src", "olmo")
    pool(tmp_path / "src", tmp_path / "out", PoolOptions(recipe="mean", kv_heads=1))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 1


def test_inspect_kv_table_matches_the_formula(tmp_path):
    build_tiny(tmp_path / "src", "gemma", num_key_value_heads=4)  # MHA, head_dim 32 != hidden / heads
    report = inspect_checkpoint(tmp_path / "src", InspectOptions(seq_len=100, batch=3))
    assert report["head_dim"] == 32 and report["num_key_value_heads"] == 4
    rows = {row["kv_heads"]: row for row in report["kv_cache"]}
    assert sorted(rows) == [1, 2, 4]
    for g, row in rows.items():
        assert row["bytes_per_token"] == 2 * g * 32 * 2 * 4  # K and V, head_dim, layers, float32
        assert row["bytes_total"] == row["bytes_per_token"] * 300
    assert rows[1]["saving_vs_mha"] == pytest.approx(0.75)
    model = load(tmp_path / "src")
    assert report["parameters"] == sum(p.numel() for p in model.parameters())


def test_inspect_cli_json_and_table(tmp_path):
    build_tiny(tmp_path / "src", "llama")
    result = runner.invoke(app, ["inspect", str(tmp_path / "src"), "--json", "--cache-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cache_dtype"] == "bfloat16" and report["kv_cache"][0]["kv_heads"] == 4
    text = runner.invoke(app, ["inspect", str(tmp_path / "src")]).stdout
    assert "<- now" in text and "(expand first)" in text


def test_library_callers_get_the_cli_checks(tmp_path):
    """Options validate themselves: a contradiction, a missing input or a bad value is refused."""
    from gqa_convert.errors import GQAConvertError

    with pytest.raises(GQAConvertError, match="--method mean contradicts --recipe aligned-refined"):
        PoolOptions(kv_heads=1, method="mean", recipe="aligned-refined", calib_data=("c.txt",))
    with pytest.raises(GQAConvertError, match="choose one of auto"):
        InspectOptions(cache_dtype="bad")
    with pytest.raises(GQAConvertError, match="--method 'median' is not known"):
        PoolOptions(kv_heads=1, method="median")
    with pytest.raises(GQAConvertError, match="unknown recipe 'median'"):
        PoolOptions(kv_heads=1, recipe="median")
    with pytest.raises(GQAConvertError, match=r"recipe aligned-similarity calibrates .*--calib-data"):
        PoolOptions(kv_heads=1, recipe="aligned-similarity")
    with pytest.raises(GQAConvertError, match="size 'lots'"):
        PoolOptions(kv_heads=1, max_shard_size="lots")
    with pytest.warns(UserWarning, match="--calib-data, --calib-tokens ignored: recipe mean uses no calibration"):
        PoolOptions(kv_heads=1, recipe="mean", calib_data=("c.txt",), calib_tokens=10)


def test_method_is_the_recipe_of_that_name():
    """--method M is --recipe M; both given agree or are refused; neither: the default recipe."""
    from gqa_convert.surgery.recipes import DEFAULT_RECIPE

    assert PoolOptions(kv_heads=1).recipe == RECIPES[DEFAULT_RECIPE]
    for name in ("mean", "first", "random"):
        assert (
            PoolOptions(kv_heads=1, method=name).recipe == RECIPES[name] == PoolOptions(kv_heads=1, recipe=name).recipe
        )
    both = PoolOptions(kv_heads=1, method="aligned", recipe="aligned-similarity", calib_data=("c.txt",))
    assert both.recipe == RECIPES["aligned-similarity"]


def test_cli_choices_come_from_the_registries():
    from gqa_convert.surgery.methods import METHODS

    text = runner.invoke(app, ["pool", "--help"], env={"COLUMNS": "300"}).stdout
    for name in METHODS:
        assert name in text
    listed = runner.invoke(app, ["recipes"]).stdout.splitlines()
    assert [line.split()[0] for line in listed] == list(RECIPES)


@pytest.mark.parametrize("command", ["inspect", "pool", "expand", "uptrain", "eval"])
def test_help_shows_flags_as_flags(command):
    text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
    assert "--help" in text and "<bool>" not in text
