"""Calibrated conversion on tiny models: the aligned merge is exact where heads are copies (biases,
partial rotary, k norms included), similarity grouping finds shuffled heads and the query permutation
keeps the function, and bad calibration input is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from gqa_convert.errors import GQAConvertError
from gqa_convert.surgery.convert import expand, pool
from gqa_convert.surgery.options import PoolOptions
from gqa_convert.surgery.recipes import RECIPES

from helpers import SAMPLE, calibrated, fails, with_settings
from helpers import build_calibratable as build
from tiny_models import load, logits, save_tiny_tokenizer

ARCHITECTURES = ["llama", "qwen2", "phi", "stablelm", "olmo2", "qwen3", "gemma2", "mistral"]
# phi without its q/k norms: partial rotary (a band of non-rotary dimensions) with biases;
# cohere without its norms: interleaved RoPE pairs
VARIANTS = [(name, {}) for name in ARCHITECTURES] + [
    ("phi", {"qk_layernorm": False}),
    ("cohere", {"use_qk_norm": False}),
]


@pytest.mark.parametrize(
    "model_type, overrides", VARIANTS, ids=[f"{m}{'-' if o else ''}{'-'.join(o)}" for m, o in VARIANTS]
)
def test_aligned_merge_of_copied_heads_is_exact(tmp_path, model_type, overrides):
    original = build(tmp_path / "src", model_type, **overrides)
    expand(tmp_path / "src", tmp_path / "mha")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-norm models warn that K is mean-pooled
        pool(tmp_path / "mha", tmp_path / "back", calibrated(2))
    torch.testing.assert_close(logits(load(tmp_path / "back")), logits(original), atol=2e-3, rtol=2e-3)


def shuffle_heads(model: transformers.PreTrainedModel, order: list[int]) -> None:
    """Reorder the heads of an MHA llama: q/k/v rows and o columns alike (the same function)."""
    hd = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                projection.weight.copy_(
                    projection.weight.reshape(len(order), hd, -1)[order].reshape(-1, projection.weight.shape[1])
                )
                if projection.bias is not None:
                    projection.bias.copy_(projection.bias.reshape(len(order), hd)[order].reshape(-1))
            o = attention.o_proj.weight
            o.copy_(o.reshape(o.shape[0], len(order), hd)[:, order].reshape(o.shape[0], -1))


@pytest.mark.parametrize("method", ["mean", "aligned"])
def test_similarity_grouping_recovers_shuffled_heads(tmp_path, method):
    recipe = RECIPES["aligned-similarity"] if method == "aligned" else RECIPES["mean"].replace(grouping="similarity")
    original = build(tmp_path / "src", "llama", num_attention_heads=8, num_key_value_heads=4)
    reference = logits(original)
    expand(tmp_path / "src", tmp_path / "mha")
    shuffled = load(tmp_path / "mha")
    shuffle_heads(shuffled, [5, 2, 7, 0, 3, 6, 1, 4])  # copies of a kv head no longer side by side
    torch.testing.assert_close(logits(shuffled), reference, atol=1e-4, rtol=1e-4)
    shuffled.save_pretrained(tmp_path / "shuffled")
    save_tiny_tokenizer(tmp_path / "shuffled")

    pool(tmp_path / "shuffled", tmp_path / "contiguous", PoolOptions(recipe="mean", kv_heads=4))
    assert not torch.allclose(logits(load(tmp_path / "contiguous")), reference, atol=1e-2)  # the test can fail
    pool(tmp_path / "shuffled", tmp_path / "similar", calibrated(4, recipe))
    torch.testing.assert_close(logits(load(tmp_path / "similar")), reference, atol=2e-3, rtol=2e-3)


def test_calibration_input_is_checked(tmp_path):
    build(tmp_path / "src", "llama")
    out = tmp_path / "out"
    fails(["pool", tmp_path / "src", "-o", out, "-g", 1, "--method", "aligned"], "recipe aligned", "--calib-data")
    fails(["pool", tmp_path / "src", "-o", out, "-g", 1, "--recipe", "aligned-refined"], "--calib-data FILE")
    fails(
        ["pool", tmp_path / "src", "-o", out, "-g", 1, "--method", "aligned", "--calib-data", tmp_path / "no.txt"],
        "data not found",
    )
    (tmp_path / "short.txt").write_text("Too little text to calibrate anything.")
    args = ["pool", tmp_path / "src", "-o", out, "-g", 1, "--method", "aligned", "--calib-data", tmp_path / "short.txt"]
    fails([*args, "--calib-seq-len", 64], "calibration needs at least")
    fails(args, "--calib-seq-len 512 is above the model's 256 positions")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_aligned_refuses_fused_projections(tmp_path):
    build(tmp_path / "src", "phi3")
    with pytest.raises(GQAConvertError, match="use --recipe mean"):
        pool(tmp_path / "src", tmp_path / "out", calibrated(1))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["attention", "block"])
def test_refinement_lowers_the_held_out_error_and_keeps_exact_merges(tmp_path, target):
    """Copies merge exactly (nothing to refine); a real merge is refined, the held-out check decides."""
    original = build(tmp_path / "src", "qwen2", num_attention_heads=8, num_key_value_heads=4)
    plain = RECIPES["closed-form"]  # leaves room to refine
    refined = with_settings("closed-form", refine=dict(steps=20, lr=1e-3, target=target))
    expand(tmp_path / "src", tmp_path / "mha")
    pool(tmp_path / "mha", tmp_path / "back", calibrated(4, refined))
    torch.testing.assert_close(logits(load(tmp_path / "back")), logits(original), atol=2e-3, rtol=2e-3)

    pool(tmp_path / "src", tmp_path / "plain", calibrated(1, plain))
    pool(tmp_path / "src", tmp_path / "refined", calibrated(1, refined))
    from transformers import AutoTokenizer

    from gqa_convert.data.text import tokenize_text
    from gqa_convert.evaluation import perplexity_of

    ids = tokenize_text(AutoTokenizer.from_pretrained(tmp_path / "src"), SAMPLE.read_text())
    plain, better = (perplexity_of(load(tmp_path / name), ids, 64)["perplexity"] for name in ("plain", "refined"))
    reference = perplexity_of(original, ids, 64)["perplexity"]
    assert abs(better - reference) < abs(plain - reference), (reference, plain, better)


def _block_error(model: transformers.PreTrainedModel, reference: list[torch.Tensor], ids: torch.Tensor) -> list[float]:
    """Per layer: the mean over tokens of the squared error of the residual stream after the layer,
    relative to the original's (transformers' own forward, not the refinement's code)."""
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    return [float(((s - r).pow(2).sum(-1) / r.pow(2).sum(-1)).mean()) for s, r in zip(states, reference)]


def test_block_refinement_brings_the_layer_outputs_closer_to_the_original(tmp_path):
    """The block target fits the residual stream after each layer: on held-out text, the layers'
    outputs move toward the original's (transformers' last hidden state is normed: not compared)."""
    original = build(tmp_path / "src", "llama", num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)
    data = (SAMPLE.parent / "calibration.txt",)
    pool(tmp_path / "src", tmp_path / "plain", calibrated(1, "closed-form", data, calib_tokens=4096))
    block = with_settings("closed-form", refine=dict(steps=30, lr=1e-3, target="block"))
    pool(tmp_path / "src", tmp_path / "block", calibrated(1, block, data, calib_tokens=4096))
    from transformers import AutoTokenizer

    from gqa_convert.data.text import tokenize_text

    text = (SAMPLE.parent / "heldout.txt").read_text()
    ids = tokenize_text(AutoTokenizer.from_pretrained(tmp_path / "src"), text)[: 32 * 64].view(32, 64)
    with torch.no_grad():
        reference = original(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    plain, refined = (_block_error(load(tmp_path / name), reference, ids) for name in ("plain", "block"))
    assert refined[0] < 0.99 * plain[0] and refined[1] < 0.99 * plain[1], (plain, refined)


@pytest.mark.parametrize("name", ["attention", "block"])
def test_refinement_gradient_accumulated_batch_by_batch_is_the_full_batch_one(name):
    """One batch's activations in memory at a time, the step of one graph over every batch: against the
    errors written out (the squared error over the targets' squared norm; the mean over all tokens of each
    token's squared error relative to its target's)."""
    from gqa_convert.surgery.aligned.refine import TARGETS, measure

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    batches = [(torch.randn(1 + b, 5, 8), {}, torch.randn(1 + b, 5, 8) * (1 + 3 * b)) for b in range(3)]
    outputs = [module(hidden) for hidden, _, _ in batches]
    targets = [target for _, _, target in batches]
    if name == "attention":
        full = sum((o - t).pow(2).sum() for o, t in zip(outputs, targets)) / sum(t.pow(2).sum() for t in targets)
    else:
        full = torch.cat([((o - t).pow(2).sum(-1) / t.pow(2).sum(-1)).flatten() for o, t in zip(outputs, targets)])
        full = full.mean()
    full.backward()
    expected = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    value = measure(module, batches, TARGETS[name], backward=True)
    assert value == pytest.approx(float(full), rel=1e-6)
    for found, wanted in zip((p.grad for p in module.parameters()), expected):
        torch.testing.assert_close(found, wanted, rtol=1e-5, atol=1e-7)


def test_refine_settings_are_checked_and_warned_about_when_unused():
    from gqa_convert.surgery.aligned import RefineSettings

    with pytest.raises(GQAConvertError, match="target 'mlp' is not known: choose one of attention, block"):
        RefineSettings(steps=5, target="mlp")
    with pytest.warns(UserWarning, match="refine.lr and refine.target are ignored with refine.steps 0"):
        with_settings("aligned", refine=dict(steps=0, target="attention"))
    with pytest.warns(UserWarning, match="its refine settings are not used by method mean"):
        RECIPES["mean"].replace(refine=RefineSettings(steps=3))


def test_recipes_run_the_same_on_every_device():
    """A recipe means the same everywhere: aligned does not refine, aligned-refined refines 100 steps
    toward the block's output, on a CPU as on a GPU (no setting depends on the device)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for device in ("cpu", "auto"):
            assert calibrated(1, "aligned", device=device).resolved_recipe.refine.steps == 0
            refined = calibrated(1, "aligned-refined", device=device).resolved_recipe.refine
            assert (refined.steps, refined.target, refined.lr) == (100, "block", 3e-4)


def test_refinement_of_a_model_with_kv_dependent_k_norms_is_skipped_with_a_warning(tmp_path):
    """olmo2 normalises K over all kv heads at once: the merged norm is not a tensor refinement fits,
    so each layer's refinement is skipped (named in a warning) and the output still loads."""
    build(tmp_path / "src", "olmo2", num_attention_heads=8, num_key_value_heads=4)
    recipe = with_settings("aligned", refine=dict(steps=2))
    with pytest.warns(UserWarning, match="refinement skipped for model.layers.0.*k_norm"):
        pool(tmp_path / "src", tmp_path / "out", calibrated(1, recipe))
    assert load(tmp_path / "out").config.num_key_value_heads == 1
