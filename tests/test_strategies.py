"""Choosing the strategy: --strategy and the YAML's distributed_type agree or the run is refused in one
line, nothing runs silently as something else; the launch command for each; the worker refuses a
launcher that set up sharding of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gqa_convert.errors import GQAConvertError
from gqa_convert.train.accelerate_yaml import read_accelerate_config
from gqa_convert.train.checkpoint.contract import check_compatible, run_identity
from gqa_convert.train.launch import launch_command
from gqa_convert.train.plan import TrainPlan
from gqa_convert.train.settings import TrainSettings
from gqa_convert.train.strategies import resolve_strategy

from helpers import fails
from tiny_models import build_trainable, save_tiny_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SAMPLE = Path(__file__).parent / "data" / "sample.txt"


def settings(**extra: object) -> TrainSettings:
    return TrainSettings(model="m", out="o", data="d", **extra)


def resolved(**extra: object) -> str:
    """The strategy a run of these settings gets on a machine without GPUs."""
    chosen = settings(**extra)
    yaml = read_accelerate_config(chosen.accelerate_config) if chosen.accelerate_config else None
    return resolve_strategy(chosen.strategy, yaml, "no", cuda=False).name


def yaml_file(tmp_path: Path, **config: object) -> str:
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_strategy_from_the_flag_and_the_yaml():
    assert resolved() == "ddp"
    assert resolved(strategy="fsdp2") == "fsdp2"
    assert resolved(accelerate_config=str(CONFIGS / "fsdp2.yaml")) == "fsdp2"
    assert resolved(accelerate_config=str(CONFIGS / "fsdp2.yaml"), strategy="fsdp2") == "fsdp2"
    # a plain multi-process YAML says how many processes, not how to shard
    assert resolved(accelerate_config=str(CONFIGS / "two_node.yaml"), strategy="fsdp2") == "fsdp2"
    assert resolved(accelerate_config=str(CONFIGS / "multi_gpu_ddp.yaml")) == "ddp"


@pytest.mark.parametrize(
    "config, strategy, expected",
    [
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2}}, "ddp", "conflicts with"),
        ({"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 1}}, "auto", "FSDP version 1"),
        ({"distributed_type": "FSDP"}, "fsdp2", "FSDP version 1"),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}}, "auto", "stage 2"),
        (
            {"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}},
            "auto",
            "deepspeed strategy needs GPUs",
        ),
        ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}}, "fsdp2", "conflicts with"),
        ({"distributed_type": "MULTI_GPU"}, "deepspeed", "configs/deepspeed_zero3.yaml"),
        ({"distributed_type": "XLA"}, "auto", "not supported"),
    ],
)
def test_refused_choices(tmp_path, config, strategy, expected):
    with pytest.raises(GQAConvertError, match=expected):
        resolved(accelerate_config=yaml_file(tmp_path, **config), strategy=strategy)


def test_yaml_settings_not_applied_are_named(tmp_path):
    config = {
        "distributed_type": "FSDP",
        "mixed_precision": "bf16",
        "fsdp_config": {"fsdp_version": 2, "fsdp_offload_params": True},
    }
    with pytest.warns(UserWarning, match=r"ignored: mixed_precision bf16 .*; fsdp_offload_params: True"):
        resolved(accelerate_config=yaml_file(tmp_path, **config))


def test_refused_before_any_work(tmp_path):
    model = tmp_path / "model"
    build_trainable(model, "llama")
    out = tmp_path / "out"
    args = ["uptrain", model, "-o", out, "--data", SAMPLE, "--seq-len", 32, "--tokens", 1024]
    fails([*args, "--accelerate-config", CONFIGS / "fsdp2.yaml", "--strategy", "ddp"], "conflicts with", "fsdp2")
    fails([*args, "--accelerate-config", CONFIGS / "deepspeed_zero3.yaml"], "deepspeed strategy needs GPUs")
    assert not out.exists()


def plan(strategy: str, world: int, accum: int = 1, tokens: str = "train-x", **extra: object) -> TrainPlan:
    precision = "bf16" if strategy == "deepspeed" else "no"
    return TrainPlan(settings(**extra), strategy, precision, world, accum, 10, "", 320, tokens)


def empty_token_folder(folder: Path) -> str:
    from gqa_convert.data.manifest import MANIFEST, build_manifest, tokenizer_identity

    folder.mkdir()
    identity = tokenizer_identity(save_tiny_tokenizer(folder.parent / "tokenizer"))
    manifest = build_manifest([], identity, "uint16", {})
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return str(folder)


def test_launch_commands():
    assert launch_command(plan("ddp", 1)) is None and launch_command(plan("fsdp2", 1)) is None  # this process
    command = launch_command(plan("fsdp2", 2, accelerate_config=str(CONFIGS / "fsdp2.yaml"), num_processes=2))
    # the FSDP YAML gives processes and machines; --multi_gpu keeps Accelerate from applying FSDP itself
    assert command[command.index("--config_file") + 1].endswith("fsdp2.yaml") and "--multi_gpu" in command
    assert command[command.index("--num_processes") + 1] == "2" and command[-2:] == ["-m", "gqa_convert.train.loop"]
    command = launch_command(plan("ddp", 4, main_process_port=20123))
    assert command[command.index("--main_process_port") + 1] == "20123"  # one machine: the port still applies
    assert "--main_process_port" not in launch_command(plan("ddp", 4))
    command = launch_command(plan("deepspeed", 1, accelerate_config=str(CONFIGS / "deepspeed_zero3.yaml")))
    assert command is not None and "--multi_gpu" not in command  # Accelerate builds the DeepSpeed plugin
    command = launch_command(plan("fsdp2", 4, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1"))
    for flag, value in [("--num_machines", "2"), ("--machine_rank", "1"), ("--rdzv_backend", "c10d")]:
        assert command[command.index(flag) + 1] == value


def test_a_worker_refuses_sharding_the_launcher_set_up(monkeypatch):
    from gqa_convert.train.runtime import start

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(GQAConvertError, match="the launcher set up FSDP but this run's strategy is fsdp2"):
        start(plan("fsdp2", 2))


def test_world_size_may_change_except_under_deepspeed(tmp_path):
    """DCP reshards onto another world size; DeepSpeed's partitioned files are refused in one line."""
    tokens = empty_token_folder(tmp_path / "tokens")

    def identity(fmt: str, world: int, global_batch: int) -> dict:
        facts = dict(model="m", teacher=None, steps=10, data=tokens, precision="bf16")
        return run_identity(settings(), **facts, global_batch=global_batch, checkpoint_format=fmt, world=world)

    for fmt in ("dcp", "deepspeed"):
        saved = identity(fmt, 8, 32)
        smaller = identity(fmt, 4, 32)  # the same global batch on half the processes
        if fmt == "dcp":
            check_compatible(saved, smaller, "step-00000010")
        else:
            with pytest.raises(GQAConvertError, match="8 processes; this run has 4 processes"):
                check_compatible(saved, smaller, "step-00000010")
        with pytest.raises(GQAConvertError, match=r"a global batch of 32 sequences.*this run has a global batch of 16"):
            check_compatible(saved, identity(fmt, 4, 16), "step-00000010")


def test_checkpoints_open_inside_a_zero3_run(tmp_path, monkeypatch):
    """After DeepSpeed ZeRO-3 starts, transformers builds every model under deepspeed.zero.Init, which
    cannot partition the meta model that checks a checkpoint's tensor names (the export reopens the
    source): the check must build its model without it."""
    import sys
    import types

    import transformers.modeling_utils as modeling_utils

    from gqa_convert.io.sources import open_checkpoint

    build_trainable(tmp_path / "model")

    def zero_init(**_: object) -> None:
        raise RuntimeError("Cannot copy out of meta tensor; no data!")

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(Init=zero_init)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(modeling_utils, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setattr(modeling_utils, "deepspeed_config", lambda: {}, raising=False)
    checkpoint = open_checkpoint(str(tmp_path / "model"))
    assert checkpoint.config.model_type == "llama" and checkpoint.tensors
