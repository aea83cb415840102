"""uptrain --dry-run's plan: the activation model against the tensors autograd saves, the memory
arithmetic of each strategy against sums written out by hand, the predicted peak against the peak of
allocated tensor memory measured during real training steps, the smallest change that fits, and the
command from a config.json alone."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import transformers
from torch.autograd.graph import saved_tensors_hooks

from gqa_convert.cli import app as app_
from gqa_convert.planning.activations import activations, layer_bytes_per_token
from gqa_convert.planning.advice import smallest_changes
from gqa_convert.planning.hardware import GPUS, flops_per_token, known_gpu
from gqa_convert.planning.memory import StepSetup, plan_memory
from gqa_convert.planning.shapes import model_shape, read_config

from helpers import SAMPLE, fails, runner

LLAMA_70B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip


def _llama(**overrides) -> transformers.LlamaConfig:
    shape = dict(
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=100, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaConfig(**{**shape, **overrides})


# ---- the activation model: what autograd keeps ----
@pytest.mark.parametrize("trainable", ["all", "attention"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_decoder_layer_keeps_what_the_activation_model_counts(trainable, precision):
    """Oracle: the distinct storages autograd saves in a LlamaDecoderLayer's forward (parameters and
    the rotary tables shared by all layers left out), against tokens x layer_bytes_per_token; bf16 is
    how fsdp2 and DeepSpeed compute (parameters cast to bf16, no autocast)."""
    config = _llama()
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    if trainable == "attention":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = ".self_attn." in name
    batch, seq = 3, 20
    hidden = torch.randn(batch, seq, config.hidden_size, requires_grad=True, dtype=dtype)
    positions = torch.arange(seq)[None]
    rotary = model.model.rotary_emb(hidden, positions)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *rotary, hidden]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model.layers[0](hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    # in fp32 the first norm saves the layer's input itself (left out above); in bf16 an fp32 copy of it
    kept_input = batch * seq * config.hidden_size * 4 if precision == "fp32" else 0
    expected = batch * seq * layer_bytes_per_token(model_shape(config), precision, trainable)
    assert sum(saved.values()) + kept_input == expected


def test_activation_arithmetic_by_hand():
    shape = model_shape(_llama())
    tokens, h, kv, mlp, heads = 4 * 32, 64, 2 * 16, 176, 4
    fp32_layer = tokens * (4 * (8 * h + 2 * kv + 4 * mlp) + 4 * (2 + heads))
    acts = activations(shape, 4, 32, "fp32", checkpointing=False)
    assert acts.per_layer == fp32_layer and acts.layers == 2 * fp32_layer
    # bf16 parameters: fp32 copies of the norms' inputs, the rest 2 bytes
    bf16 = activations(shape, 4, 32, "bf16", checkpointing=False)
    assert bf16.per_layer == tokens * (4 * 2 * h + 2 * (6 * h + 2 * kv + 4 * mlp) + 4 * (2 + heads))
    checkpointed = activations(shape, 4, 32, "fp32", checkpointing=True)
    assert checkpointed.per_layer == tokens * h * 4  # the layer's input only
    assert checkpointed.backward_working - acts.backward_working == fp32_layer  # one layer recomputed
    positions = 4 * 31
    assert acts.loss_saved == positions * h * 4 + 100 * h * 4  # d loss / d hidden and d loss / d head
    assert activations(shape, 4, 32, "fp32", False, "attention").loss_saved == positions * h * 4


# ---- the strategies' arithmetic, against sums written out ----
def _tensors(hidden: int, inter: int, kv: int, vocab: int, layers: int) -> list[tuple[int, int]]:
    """(rows, columns) of every parameter of an untied Llama, as its modules declare them."""
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]  # q, k, v, o
    layer += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden, 1), (hidden, 1)]  # gate, up, down, norms
    return [(vocab, hidden)] + layer * layers + [(hidden, 1), (vocab, hidden)]


def test_ddp_fsdp2_and_deepspeed_memory_by_hand():
    shape = model_shape(_llama(hidden_size=512, intermediate_size=1024, vocab_size=1000))
    tensors = _tensors(512, 1024, 2 * 128, 1000, 2)
    total = sum(r * c for r, c in tensors)
    assert shape.parameters == total
    base = dict(precision="bf16", device="cuda", micro_batch=1, seq_len=16)

    ddp = plan_memory(shape, StepSetup(strategy="ddp", world=2, **base))
    assert (ddp.parameters, ddp.gradients, ddp.optimizer, ddp.buffers) == (4 * total, 4 * total, 8 * total, 4 * total)
    assert ddp.phases["optimizer step"] == 20 * total  # fused AdamW: no temporaries
    assert plan_memory(shape, StepSetup(strategy="ddp", world=1, **base)).buffers == 0

    fsdp2 = plan_memory(shape, StepSetup(strategy="fsdp2", world=3, **base))
    shard = sum(math.ceil(r / 3) * c for r, c in tensors)  # split along dim 0, padded
    assert (fsdp2.parameters, fsdp2.gradients, fsdp2.optimizer) == (4 * shard, 4 * shard, 8 * shard)
    assert fsdp2.phases["optimizer step"] == 16 * shard + 4 * shard  # foreach AdamW's copy of the moments

    deepspeed = plan_memory(shape, StepSetup(strategy="deepspeed", world=8, **base))
    persistent = 5 * 512  # the norms: under 1e5 elements, whole on every GPU
    partition = math.ceil(total / 8)
    assert deepspeed.parameters == 2 * (math.ceil((total - persistent) / 8) + persistent) + 4 * partition
    bucket = 2 * 500_000_000  # the reduce bucket, in bf16
    assert (deepspeed.gradients, deepspeed.optimizer, deepspeed.buffers) == (2 * partition, 8 * partition, bucket)
    fp32 = plan_memory(shape, StepSetup(strategy="deepspeed", world=8, **{**base, "precision": "no"}))
    assert fp32.parameters == 4 * (math.ceil((total - persistent) / 8) + persistent)  # the master weights are them

    attention = plan_memory(shape, StepSetup(strategy="ddp", world=1, trainable="attention", **base))
    q_k_v_o = 2 * (512 * 512 * 2 + 256 * 512 * 2)
    assert (attention.gradients, attention.optimizer) == (4 * q_k_v_o, 8 * q_k_v_o)


def test_teacher_and_margin():
    shape = model_shape(_llama())
    teacher = model_shape(_llama(num_key_value_heads=4))
    setup = StepSetup(strategy="fsdp2", world=4, precision="bf16", device="cuda", micro_batch=2, seq_len=64)
    plan = plan_memory(shape, setup, teacher)
    assert plan.teacher == 2 * sum(math.ceil(t.rows / 4) * (t.numel // t.rows) for t in teacher.tensors)
    assert plan.margin == round(0.1 * plan.peak) + (1 << 30) and plan.required == plan.peak + plan.margin
    assert "teacher forward" in plan.phases


# ---- the prediction against a measured training step ----
def _measured_peak(settings, tmp_path) -> int:
    """Peak of allocated CPU tensor bytes during the second training step, from torch.profiler's memory
    events (the CPU allocator's running total, counted from before the model existed: parameters,
    optimizer state, activations and temporaries, nothing else). RSS would add the interpreter, the
    libraries, the allocator's cached pages and pages never touched; it measures a process, not tensors."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from gqa_convert.train.loop import Trainer
    from gqa_convert.train.plan import prepare
    from gqa_convert.train.runtime import start, stop

    plan = prepare(settings)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        runtime = start(plan)
        try:
            trainer = Trainer(plan, runtime)
            for step in range(2):  # the second has the optimizer's state
                with record_function(f"planned step {step}"):
                    trainer.step = trainer.train_step()["step"]
        finally:
            stop(runtime)
    trace = tmp_path / "trace.json"
    profiler.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events if e["name"] == "[memory]"
    )
    last = next(e for e in events if e["name"] == "planned step 1" and "dur" in e)
    before = memory[0][1] - memory[0][2]  # the counter before the first allocation seen
    return max(total for ts, total, _ in memory if last["ts"] <= ts <= last["ts"] + last["dur"]) - before


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """A small Llama (2 kv heads) and a teacher of the same shape with 4, with their tokenizer."""
    from tiny_models import save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("planned")
    vocab = len(save_tiny_tokenizer(folder / "model"))
    save_tiny_tokenizer(folder / "teacher")
    for name, kv in (("model", 2), ("teacher", 4)):
        torch.manual_seed(0)
        config = _llama(hidden_size=128, intermediate_size=352, num_key_value_heads=kv, vocab_size=vocab)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / name)
    return folder


@pytest.mark.parametrize(
    "case", [dict(strategy="ddp"), dict(strategy="fsdp2", gradient_checkpointing=True), dict(teacher=True)]
)
def test_the_predicted_peak_is_within_20_percent_of_the_measured_one(case, small_models, tmp_path):
    from gqa_convert.train.settings import TrainSettings

    case = {"strategy": "ddp", **case}
    teacher = str(small_models / "teacher") if case.pop("teacher", False) else None
    settings = TrainSettings(
        model=str(small_models / "model"), out=str(tmp_path / "out"), data=str(SAMPLE), tokens=str(3 * 4 * 64),
        seq_len=64, micro_batch_size=4, num_processes=1, teacher=teacher, **case,
    )  # fmt: skip
    measured = _measured_peak(settings, tmp_path)
    setup = StepSetup(
        strategy=settings.strategy, world=1, precision="no", device="cpu", micro_batch=4, seq_len=64,
        checkpointing=settings.gradient_checkpointing,
    )  # fmt: skip
    shape = model_shape(read_config(small_models / "model"))
    predicted = plan_memory(shape, setup, model_shape(read_config(teacher)) if teacher else None).peak
    assert abs(predicted / measured - 1) < 0.2, (predicted, measured)


# ---- the smallest change ----
def test_the_smallest_changes_fit_and_milder_ones_do_not():
    shape = model_shape(_llama(hidden_size=512, intermediate_size=1024, vocab_size=1000, num_hidden_layers=8))
    setup = StepSetup(strategy="ddp", world=8, precision="no", device="cpu", micro_batch=8, seq_len=2048)
    available = int(plan_memory(shape, setup).required * 0.6)
    changes = smallest_changes(shape, setup, available)
    assert changes and all(change.plan.required <= available for change in changes)
    by_flag = {change.flags.split()[0]: change for change in changes}
    micro = by_flag["--micro-batch-size"].plan.setup
    assert micro.micro_batch * micro.grad_accum == 8  # the global batch is kept
    larger = min(m for m in (1, 2, 4, 8) if m > micro.micro_batch)
    assert (
        plan_memory(shape, dataclasses.replace(setup, micro_batch=larger, grad_accum=8 // larger)).required > available
    )
    assert "--gradient-checkpointing" in by_flag

    sharded = dataclasses.replace(setup, strategy="fsdp2", world=2, micro_batch=1, checkpointing=True)
    small = int(plan_memory(shape, dataclasses.replace(sharded, world=16)).required * 1.01)
    gpus = [c for c in smallest_changes(shape, sharded, small) if c.flags.startswith("--num-processes")]
    world = gpus[0].plan.setup.world
    assert gpus[0].plan.required <= small < plan_memory(shape, dataclasses.replace(sharded, world=world - 1)).required


# ---- the command ----
LLAMA_8B = {
    **LLAMA_70B,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
}


def _config_folder(tmp_path, config: dict):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_config_json_alone_is_planned_and_nothing_is_written(tmp_path):
    folder, out = _config_folder(tmp_path, LLAMA_8B), tmp_path / "out"
    args = ["uptrain", folder, "-o", out, "--data", SAMPLE, "--tokens", "1B", "--seq-len", 4096]
    args += ["--micro-batch-size", 1, "--num-processes", 8, "--gpu", "h100", "--dry-run"]
    result = runner.invoke(app_, [str(a) for a in [*args, "--json"]])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["parameters"] == 8_030_261_248  # Llama-3-8B's published count
    assert plan["strategy"] == "ddp" and plan["precision"] == "bf16" and plan["fits"] is False
    assert plan["memory"]["parameters"] == 4 * 8_030_261_248 and plan["steps"] == math.ceil(1e9 / (8 * 4096))
    assert plan["changes"] and all(c["required"] <= GPUS["h100"].memory for c in plan["changes"])
    assert plan["time"]["source"].startswith("estimate") and plan["time"]["gpu_hours"] > 0
    other = plan["other_checkpointing"]  # the same step with checkpointing on
    assert other["gradient_checkpointing"] and other["activations"] < plan["memory"]["activations"]
    table = runner.invoke(app_, [str(a) for a in args]).stdout
    assert "does NOT fit" in table and plan["changes"][0]["change"] in table and "GPU-hours" in table
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["config-only"]

    stated = runner.invoke(
        app_, [str(a) for a in [*args, "--json", "--tokens-per-second", 1000, "--strategy", "fsdp2"]]
    )
    timed = json.loads(stated.stdout)["time"]
    assert timed["hours"] == round(plan["tokens"] / (1000 * 8) / 3600, 3) and timed["source"].startswith("stated")


def test_without_a_gpu_the_figures_come_without_a_verdict(tmp_path):
    folder = _config_folder(tmp_path, {**LLAMA_8B, "num_hidden_layers": 2})
    result = runner.invoke(
        app_,
        ["uptrain", str(folder), "-o", str(tmp_path / "out"), "--data", str(SAMPLE), "--tokens", "1M", "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    if not torch.cuda.is_available():
        assert "GPU: none detected; pass --gpu" in result.stdout and "no time estimate" in result.stdout


def test_a_gguf_sources_config_is_planned():
    from gqa_convert.planning.run_plan import plan_run
    from gqa_convert.train.settings import TrainSettings

    from real_model import smollm2_gguf

    plan = plan_run(TrainSettings(model=str(smollm2_gguf()), out="unused", data="unused", tokens="1M", seq_len=512))
    assert plan.shape.parameters == 134_515_008 and plan.shape.tied and plan.shape.kv_heads == 3


def test_bad_plan_settings_fail_in_one_line(tmp_path):
    folder = _config_folder(tmp_path, {**LLAMA_8B, "num_hidden_layers": 1})
    base = ["uptrain", folder, "-o", tmp_path / "out", "--data", SAMPLE, "--tokens", "1M", "--dry-run"]
    fails([*base, "--gpu-memory", "0"], "less than one byte")
    fails([*base, "--gpu-memory", "lots"], "not understood")
    fails([*base, "--mfu", "0"], "--mfu must be greater than 0")
    fails([*base, "--mfu", "1.5"], "--mfu must be at most 1")
    fails([*base, "--tokens-per-second", "nan"], "finite")
    fails([*base, "--gpu", "a6000"], "a6000")
    fails([*base[:-1], "--measure"], "--measure times one step of a --dry-run")
    fails([*base, "--strategy", "fsdp2", "--mixed-precision", "fp16"], "fsdp2 trains in bf16 or fp32")
    (folder / "config.json").write_text("{not json")
    fails(base, "not valid JSON")
    (folder / "config.json").write_text(json.dumps({**LLAMA_8B, "num_hidden_layers": -2}))
    fails(base, "num_hidden_layers")
    (folder / "config.json").write_text(json.dumps({**LLAMA_8B, "num_hidden_layers": 100_000}))
    fails(base, "100000 decoder layers")  # refused before building 100k modules
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    fails(base, "not supported")
    fails(["uptrain", tmp_path / "absent", *base[2:]], "model not found")
    (tmp_path / "t").mkdir()
    teacher = _config_folder(tmp_path / "t", {**LLAMA_8B, "num_hidden_layers": 1, "vocab_size": 1000})
    (folder / "config.json").write_text(json.dumps({**LLAMA_8B, "num_hidden_layers": 1}))
    fails([*base, "--teacher", teacher], "vocabulary")
    assert not (tmp_path / "out").exists()


def test_known_gpus():
    assert known_gpu("NVIDIA H100 PCIe").label == "H100 PCIe 80GB"
    assert known_gpu("NVIDIA H100 80GB HBM3").label == "H100 SXM 80GB"
    assert known_gpu("NVIDIA A100-SXM4-80GB").peak_flops == 312e12 and known_gpu("Tesla T4") is None
    shape = model_shape(_llama())
    six_n = 6 * (shape.parameters - 100 * 64)  # the embedding lookup is no matmul
    assert flops_per_token(shape, 32, "all", False) == six_n + 12 * 2 * 64 * 32
