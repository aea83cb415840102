"""The parts of the aligned recipe on tiny models: the frequency-aware K merge undoes what the complex
merge cannot, sequential calibration feeds each layer the merged layers' outputs, mixed calibration
texts are interleaved, the statistics equal independent computations, the device is checked."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch
import transformers

from gqa_convert.calibration import CalibrationStream, CalibrationText, calibration_ids
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import open_checkpoint
from gqa_convert.surgery.convert import expand, pool
from gqa_convert.surgery.recipes import RECIPES

from helpers import SAMPLE, calibrated, fails, runner, with_settings
from helpers import build_calibratable as build
from tiny_models import load, logits

TECHNICAL = SAMPLE.parent / "technical.txt"


def mix_low_band(model: transformers.PreTrainedModel, heads: list[int], seq_len: int, seed: int = 0) -> int:
    """In every layer of an MHA llama, mix the rows of the slowly rotating RoPE pairs (rotation <= 1
    rad over seq_len) of the given heads' K by a random orthogonal map, and their queries alike: q.k
    is unchanged where the rotation is small, but no per-pair complex scale undoes the mix."""
    config = model.config
    hd, half = config.head_dim, config.head_dim // 2
    theta = config.rope_parameters["rope_theta"]
    band = [i for i in range(half) if seq_len * theta ** (-2 * i / hd) <= 1.0]
    rows = band + [i + half for i in band]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for head in heads:
                mix = torch.linalg.qr(torch.randn(len(rows), len(rows), generator=generator)).Q
                index = [head * hd + r for r in rows]
                for projection in (attention.q_proj, attention.k_proj):
                    projection.weight[index] = mix @ projection.weight[index]
    return len(band)


def test_frequency_aware_keys_undo_a_mix_the_complex_merge_cannot(tmp_path):
    build(tmp_path / "src", "llama", attention_bias=False)
    expand(tmp_path / "src", tmp_path / "mha")
    mixed = load(tmp_path / "mha")
    assert mix_low_band(mixed, heads=[1, 3], seq_len=64) >= 2  # kv heads 1 and 3: second copies of 0 and 2
    mixed.save_pretrained(tmp_path / "mixed")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "mixed")
    reference = logits(mixed)
    errors = {}
    for key_merge in ("complex", "frequency"):
        recipe = with_settings("closed-form", aligned=dict(key_merge=key_merge))
        pool(tmp_path / "mixed", tmp_path / key_merge, calibrated(2, recipe))
        errors[key_merge] = float((logits(load(tmp_path / key_merge)) - reference).pow(2).mean().sqrt())
    assert errors["frequency"] * 5 < errors["complex"], errors


def rotate_rope_pairs(model: transformers.PreTrainedModel, heads: list[int], pairs: list[tuple[int, int]]) -> None:
    """Rotate every RoPE pair of the given heads' K and of their queries, biases included (MHA: head h
    reads kv head h), by its own random angle: a rotation in a pair's plane commutes with RoPE, the
    function stays."""
    hd = model.config.hidden_size // model.config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, head, (a, b) in itertools.product(model.model.layers, heads, pairs):
            angle = float(torch.rand(1, generator=generator)) * 2 * math.pi
            rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            rows = [head * hd + a, head * hd + b]
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight[rows] = rotation @ projection.weight[rows]
                if projection.bias is not None:
                    projection.bias[rows] = rotation @ projection.bias[rows]


# the RoPE pairs as transformers' modeling files rotate them: llama rotate_half, cohere interleaved
ROPE_PAIRS = {
    "llama": lambda hd: [(i, i + hd // 2) for i in range(hd // 2)],
    "cohere": lambda hd: [(2 * i, 2 * i + 1) for i in range(hd // 2)],
}


def text(*data, tokens: int = 512, seq_len: int = 64) -> CalibrationText:
    return CalibrationText("user", tuple(map(str, data or (SAMPLE,))), tokens, seq_len)


def key_only_errors(model_dir, key_merge: str) -> list[float]:
    """Per layer, the relative attention-output error of the K merge alone (V and o_proj kept) to one
    kv head per pair of heads, on the calibration inputs: sensitive where logits of a tiny model are not."""
    from gqa_convert.surgery.aligned import (
        AlignedSettings,
        LayerInputs,
        attention_state,
        merge_key_side,
        read_attention,
    )
    from gqa_convert.surgery.aligned.linalg import repeat_by_group
    from gqa_convert.surgery.aligned.trials import attention_error
    from gqa_convert.surgery.calibrated import rope_pairs
    from gqa_convert.surgery.plan import HeadPlan

    checkpoint = open_checkpoint(model_dir)
    plan = HeadPlan(4, 4, ((0, 1), (2, 3)), 16)
    pairs, rotary = rope_pairs(checkpoint)
    ids = calibration_ids(checkpoint, text())
    stream = CalibrationStream(checkpoint, ids, device="cpu", sequential=False, attended="none")
    errors = []
    for index in range(stream.num_layers):
        statistics = stream.collect(index)
        attention = read_attention(checkpoint, index, plan)[0]
        inputs = LayerInputs(attention, statistics, plan, pairs, rotary, False, {})
        k, q, _ = merge_key_side(inputs, AlignedSettings(key_merge=key_merge))
        merged = dataclasses.replace(attention, q=q, k=repeat_by_group(k, plan.groups, plan.old_kv))  # V kept
        errors.append(attention_error(inputs, attention_state(merged, statistics.projections), len(statistics.calls)))
        stream.advance(None)
    return errors


@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("cohere", {"use_qk_norm": False})])
def test_heads_that_differ_by_a_rotation_per_rope_pair_merge_exactly(tmp_path, model_type, overrides):
    original = build(tmp_path / "src", model_type, **overrides)
    expand(tmp_path / "src", tmp_path / "mha")
    rotated = load(tmp_path / "mha")
    rotate_rope_pairs(rotated, heads=[1, 3], pairs=ROPE_PAIRS[model_type](64 // 4))  # tiny: hidden 64, 4 heads
    torch.testing.assert_close(logits(rotated), logits(original), atol=2e-3, rtol=2e-3)  # the same function
    rotated.save_pretrained(tmp_path / "rotated")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "rotated")
    assert max(key_only_errors(tmp_path / "rotated", "complex")) < 1e-9  # a wrong pairing: 1e-6 .. 1e-5
    assert max(key_only_errors(tmp_path / "mha", "frequency")) < 1e-9
    pool(tmp_path / "rotated", tmp_path / "back", calibrated(2))
    torch.testing.assert_close(logits(load(tmp_path / "back")), logits(original), atol=2e-3, rtol=2e-3)


def test_sequential_calibration_sees_the_merged_layers_outputs(tmp_path):
    """A "merge" that halves layer 0's o_proj: with sequential calibration layer 1's attention inputs
    are those of the model so changed (computed here by transformers), without it the source's; the
    targets are the source's attention outputs either way."""
    source = build(tmp_path / "src", "llama")
    checkpoint = open_checkpoint(tmp_path / "src")
    changed = load(tmp_path / "src")
    with torch.no_grad():
        changed.model.layers[0].self_attn.o_proj.weight.mul_(0.5)
    for sequential, model in ((True, changed), (False, source)):
        ids = calibration_ids(checkpoint, text(tokens=256))
        stream = CalibrationStream(checkpoint, ids, device="cpu", sequential=sequential, attended="none")
        seen = {}
        for index in range(stream.num_layers):
            seen[index] = statistics = stream.collect(index)
            weight = statistics.module.o_proj.weight
            stream.advance({"o_proj.weight": weight * 0.5} if index == 0 else None)
        with torch.no_grad():
            states = model(input_ids=ids[:4], output_hidden_states=True).hidden_states
            expected = model.model.layers[1].input_layernorm(states[1])
            source_states = source(input_ids=ids[:4], output_hidden_states=True).hidden_states
        hidden, kwargs, target = seen[1].calls[0]
        torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-4)
        attention = source.model.layers[1].self_attn
        with torch.no_grad():
            source_output = attention(hidden_states=source.model.layers[1].input_layernorm(source_states[1]), **kwargs)[
                0
            ]
        torch.testing.assert_close(target, source_output, atol=1e-4, rtol=1e-4)


def test_calibration_texts_are_shared_and_interleaved(tmp_path):
    build(tmp_path / "src", "llama")
    checkpoint = open_checkpoint(tmp_path / "src")
    ids = calibration_ids(checkpoint, text(SAMPLE, TECHNICAL))
    alone = [calibration_ids(checkpoint, text(data, tokens=256)) for data in (SAMPLE, TECHNICAL)]
    assert ids.shape == (8, 64)
    torch.testing.assert_close(ids[0::2], alone[0])
    torch.testing.assert_close(ids[1::2], alone[1])


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"key_merge": "rotary"}, "key_merge 'rotary' is not known: choose one of frequency, complex"),
        ({"value_moment": "attention"}, "choose one of per-head, attended, plain"),
        ({"band_angle": 0.0}, "band_angle must be greater than 0"),
        ({"output_ridges": (0.3, -1.0)}, "output_ridges must be at least 0"),
        ({"output_ridges": ()}, "output_ridges must not be empty"),
    ],
)
def test_bad_aligned_settings_are_refused(setting, message):
    from gqa_convert.surgery.aligned import AlignedSettings

    with pytest.raises(GQAConvertError) as raised:
        AlignedSettings(**setting)
    assert message in str(raised.value)


@pytest.mark.parametrize("device", ["tpu", "cpu:1", "auto:0"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(GQAConvertError, match="choose auto, cpu, cuda or cuda:N"):
        calibrated(1, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_cuda_without_a_gpu_is_refused_on_one_line(tmp_path):
    build(tmp_path / "src", "llama")
    args = ["pool", tmp_path / "src", "-o", tmp_path / "out", "-g", 1, "--method", "aligned"]
    fails([*args, "--calib-data", SAMPLE, "--device", "cuda"], "no CUDA device", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_recipe_and_device_from_the_cli_reach_the_library_and_the_provenance(tmp_path):
    """--recipe closed-form --device cpu from the CLI: the provenance records the resolved recipe and the
    device, and the tensors equal those of the Python options; a recipe file's settings are recorded."""
    build(tmp_path / "src", "llama")
    args = ["pool", str(tmp_path / "src"), "-g", "1", "--calib-data", str(SAMPLE)]
    args += ["--calib-tokens", "512", "--calib-seq-len", "64", "--device", "cpu"]
    app = __import__("gqa_convert.cli").cli.app
    result = runner.invoke(app, [*args, "--recipe", "closed-form", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "cli" / "gqa_convert.json").read_text())
    assert recorded["calibration"]["device"] == "cpu" and recorded["recipe"]["name"] == "closed-form"
    assert (
        recorded["recipe"]["aligned"]["key_merge"] == "complex"
        and recorded["recipe"]["aligned"]["output_ridges"] is None
    )
    generation = {"openings": "auto", "document_tokens": 256, "temperature": 1.0, "top_p": 1.0, "seed": 0}  # text self
    expected = {"text": "user", "tokens": 512, "seq_len": 64, "sequential": False, **generation}
    assert recorded["recipe"]["calibration"] == expected
    file = tmp_path / "ridges.yaml"
    file.write_text("method: aligned\naligned:\n  output_ridges: [0.5, 2]\n")
    result = runner.invoke(app, [*args, "--recipe", str(file), "-o", str(tmp_path / "ridges")])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "ridges" / "gqa_convert.json").read_text())["recipe"]
    assert recorded["name"] == "ridges" and recorded["aligned"]["output_ridges"] == [0.5, 2.0]
    assert recorded["aligned"]["value_moment"] == "per-head"
    options = calibrated(1, RECIPES["closed-form"], calib_tokens=512, device="cpu")
    pool(tmp_path / "src", tmp_path / "api", options)
    torch.testing.assert_close(logits(load(tmp_path / "cli")), logits(load(tmp_path / "api")), atol=0, rtol=0)
    assert not math.isnan(float(logits(load(tmp_path / "cli")).sum()))


def _walk(record):
    if isinstance(record, dict):
        for key, value in record.items():
            yield key, value
            yield from _walk(value)


def test_output_solve_fits_o_proj_and_keeps_it_only_where_the_held_out_check_improves():
    from gqa_convert.surgery.aligned.output import OutputMoments, solve_output

    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 32, 12, generator=generator) for _ in range(4)]
    truth = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    start = truth + 0.3 * torch.randn(6, 12, generator=generator, dtype=torch.float64)
    moments = OutputMoments.zeros(12, 6, "cpu")
    for index, f in enumerate(features):
        moments.add(f, f.double() @ truth.T, check=index == 3)
    solved, before, after, _ = solve_output(start, moments, ridges=(1e-9,))
    torch.testing.assert_close(solved, truth, atol=1e-5, rtol=1e-5)
    assert after < 1e-9 < before
    misleading = OutputMoments.zeros(12, 6, "cpu")  # the fit batches say one thing, the check another
    for index, f in enumerate(features):
        misleading.add(f, f.double() @ (start if index == 3 else truth).T, check=index == 3)
    kept, before, after, _ = solve_output(start, misleading, ridges=(1e-9,))
    assert torch.equal(kept, start) and before < 1e-9 < after
    # of several ridges, the one the check prefers: the smallest recovers the truth, large ones stay near start
    chosen = solve_output(start, moments, ridges=(1e6, 1e-9, 1e3))
    assert chosen[3] == 1e-9 and chosen[2] < 1e-9


def test_cholesky_of_a_moment_made_indefinite_by_rounding():
    """A rank-deficient moment nudged below zero in its null space (what float32 accumulation does)
    factorizes with a grown ridge that stays small; a truly indefinite matrix still raises."""
    from gqa_convert.surgery.aligned.linalg import cholesky

    generator = torch.Generator().manual_seed(0)
    data = torch.randn(8, 32, generator=generator, dtype=torch.float64)
    moment = data.T @ data  # rank 8 of 32
    null = torch.linalg.eigh(moment)[1][:, 0]
    nudged = moment - 1e-4 * moment.diagonal().mean() * torch.outer(null, null)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(nudged + 1e-6 * nudged.diagonal().mean() * torch.eye(32, dtype=torch.float64))
    lower = cholesky(nudged)
    error = (lower @ lower.T - nudged).norm() / nudged.norm()
    assert error < 2e-3
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(-moment)


def _value_problem(heads: int = 3, d_out: int = 7, hd: int = 2, width: int = 5, seed: int = 0):
    """Random targets A_h = left_h right_h (as their factors, inner size hd + 1), per-head moments M_h
    (PSD, different per head) and a starting shared W."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    factors = randn(heads, width, 3 * width)
    moments = factors @ factors.transpose(1, 2) / (3 * width)
    return (randn(heads, d_out, hd + 1), randn(heads, hd + 1, width)), moments, randn(hd, width)


def test_shared_value_solve_matches_the_dense_normal_equations():
    """solve_shared's conjugate gradients against an independent dense solve of
    sum_h (M_h kron P_h) vec(W) = vec(sum_h C_h^T A_h M_h)."""
    from gqa_convert.surgery.aligned.values import solve_shared

    targets, moments, start = _value_problem()
    blocks = torch.randn(3, 7, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outer = blocks.transpose(1, 2) @ blocks
    # column-major vec(P W M) = (M^T kron P) vec(W)
    system = sum(torch.kron(moments[h].T.contiguous(), outer[h]) for h in range(3))
    full = targets[0] @ targets[1]  # A_h
    rhs = sum(blocks[h].T @ full[h] @ moments[h] for h in range(3))
    dense = torch.linalg.solve(system, rhs.T.reshape(-1)).reshape(5, 2).T
    assert torch.allclose(solve_shared(targets, moments, blocks, start), dense, atol=1e-8)


def test_alternating_value_merge_only_lowers_the_per_head_objective():
    """Every round of the alternation lowers sum_h ||(A_h - C_h W) L_h||^2, and the start (the
    closed form's W) is never beaten by the blocks alone."""
    from gqa_convert.surgery.aligned import values

    targets, moments, shared = _value_problem(heads=4, d_out=9, hd=3, width=8, seed=2)
    blocks = values.best_blocks(targets, moments, shared)
    history = [values.value_objective(targets, moments, blocks, shared)]
    for _ in range(5):
        shared = values.solve_shared(targets, moments, blocks, shared)
        history.append(values.value_objective(targets, moments, blocks, shared))
        blocks = values.best_blocks(targets, moments, shared)
        history.append(values.value_objective(targets, moments, blocks, shared))
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(history, history[1:]))
    assert history[-1] < 0.9 * history[0]
    residual = targets[0] @ targets[1] - blocks @ shared  # the objective from the product A_h, densely
    dense = sum(float(torch.trace(residual[h] @ moments[h] @ residual[h].T)) for h in range(4))
    assert abs(history[-1] - dense) < 1e-9 * dense


def test_per_head_attended_moments_match_transformers_attention_in_float64(tmp_path):
    """Each query head's attended moment sum_m z_h,m z_h,m^T (z_h,m = sum_n a_h(m, n) [x_n, 1]), shrunk
    toward their average by w / (w + tokens), and the average, against an independent float64
    computation from transformers' own eager attention probabilities."""
    build(tmp_path / "src", "llama")
    checkpoint = open_checkpoint(tmp_path / "src")
    ids = calibration_ids(checkpoint, text(tokens=256))
    stream = CalibrationStream(checkpoint, ids, device="cpu", sequential=True, attended="per-head")
    statistics = stream.collect(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
        x = model.model.layers[0].input_layernorm(out.hidden_states[0]).double()
    x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
    z = out.attentions[0].double() @ x[:, None]  # (B, nh, T, d + 1)
    expected = torch.einsum("bhti,bhtj->hij", z, z)
    weight = x.shape[-1] / (x.shape[-1] + statistics.tokens)
    shrunk = (1 - weight) * expected + weight * expected.mean(0)
    found = statistics.attended_per_head
    assert found.dtype == torch.float64 and found.shape == expected.shape and statistics.tokens == 256
    with pytest.raises(dataclasses.FrozenInstanceError):  # immutable once collected
        statistics.attended = None
    torch.testing.assert_close(found, shrunk, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    torch.testing.assert_close(
        statistics.attended, expected.mean(0), rtol=1e-4, atol=1e-4 * float(expected.abs().max())
    )


def test_per_head_moments_stay_positive_semidefinite_under_an_attention_sink_and_massive_activations():
    """Every head attending almost only to the first token, one input dimension 3000x the others (as in
    trained models): the moments are nearly rank one. Summed in float32 they get negative eigenvalues
    (and the V alternation then diverges); they must be PSD and equal a float64 computation."""
    from gqa_convert.calibration.statistics import moments

    generator = torch.Generator().manual_seed(0)
    batch, heads, length, width = 2, 3, 128, 16
    hidden = torch.randn(batch, length, width, generator=generator)
    hidden[..., 0] *= 3000.0
    probs = torch.full((batch, heads, length, length), 1e-3 / length)
    probs[..., 0] += 1 - 1e-3
    probs = probs.tril()
    probs = probs / probs.sum(-1, keepdim=True)
    _, _, tokens, _, found = moments(lambda hidden_states: (None, probs), [(hidden, {}, None)], "per-head")
    x = torch.cat([hidden, torch.ones(batch, length, 1)], -1).double()
    z = probs.double() @ x[:, None]
    expected = torch.einsum("bhti,bhtj->hij", z, z)
    weight = (width + 1) / (width + 1 + tokens)
    expected = (1 - weight) * expected + weight * expected.mean(0)  # shrunk toward the average
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    eigenvalues = torch.linalg.eigvalsh(found)
    assert bool((eigenvalues.min(-1).values >= -1e-15 * eigenvalues.max(-1).values).all())
    _, _, _, averaged, _ = moments(lambda hidden_states: (None, probs), [(hidden, {}, None)], "averaged")
    torch.testing.assert_close(averaged, expected.mean(0), rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    eigenvalues = torch.linalg.eigvalsh(averaged)
    assert float(eigenvalues.min()) >= -1e-15 * float(eigenvalues.max())


def test_per_head_moments_shrink_toward_their_average_as_tokens_get_few():
    from gqa_convert.calibration.statistics import shrink_moments_

    def shrink_moments(moments, tokens):
        return shrink_moments_(moments.clone(), tokens)

    _, moments, _ = _value_problem(heads=3, width=5)
    average = moments.mean(0, keepdim=True)
    torch.testing.assert_close(shrink_moments(moments, tokens=5), 0.5 * moments + 0.5 * average)
    torch.testing.assert_close(shrink_moments(moments, tokens=10**9), moments)
    assert torch.allclose(shrink_moments(moments, tokens=0), average.expand_as(moments))
