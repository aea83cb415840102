"""Which distributed strategy a run uses, decided before anything starts: --strategy, or the
distributed_type of an --accelerate-config YAML. Conflicting choices, FSDP version 1, DeepSpeed stages
other than 3 and DeepSpeed without GPUs are refused with one line; settings of the YAML that the
strategy does not apply are named in a warning.

    ddp        every process holds the whole model; gradients are averaged (also one process)
    fsdp2      torch's fully_shard on each decoder layer and on the root, applied by gqa-convert under
               a plain multi-process launch: the same code on CPU (gloo) and GPU (nccl)
    deepspeed  ZeRO-3 through Accelerate's DeepSpeed plugin (GPUs only)
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import yaml

from gqa_convert.errors import GQAConvertError
from gqa_convert.train.settings import TrainSettings, resolve_precision

# Launch-only distributed types: the YAML says how many processes and machines, not how to shard.
_PLAIN_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU")
# fsdp_config entries whose value gqa-convert's FSDP2 does not follow (it shards fully, per decoder
# layer, reshards after forward and keeps parameters on the accelerator)
_FSDP_AS_APPLIED = {
    "fsdp_offload_params": False,
    "fsdp_reshard_after_forward": True,
    "fsdp_activation_checkpointing": False,
}


def read_accelerate_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise GQAConvertError(f"cannot read the accelerate config {path}: {error}") from None
    if not isinstance(config, dict):
        raise GQAConvertError(f"{path} is not an Accelerate YAML (a mapping with distributed_type)")
    return config


def strategy_of_config(config: dict[str, Any], path: str) -> str | None:
    """fsdp2 or deepspeed when the YAML asks for sharding, None for a plain multi-process launch."""
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind in _PLAIN_TYPES:
        return None
    if kind == "FSDP":
        version = str((config.get("fsdp_config") or {}).get("fsdp_version", 1))
        if version != "2":
            raise GQAConvertError(
                f"{path} asks for FSDP version {version}, which gqa-convert does not run: set "
                "fsdp_config.fsdp_version: 2 (gqa-convert then applies FSDP2 itself)"
            )
        return "fsdp2"
    if kind == "DEEPSPEED":
        stage = _zero_stage(config.get("deepspeed_config") or {})
        if stage != 3:
            raise GQAConvertError(f"{path} asks for DeepSpeed ZeRO stage {stage}: gqa-convert runs stage 3 only")
        return "deepspeed"
    raise GQAConvertError(f"{path}: distributed_type {kind} is not supported (use NO, MULTI_GPU, FSDP or DEEPSPEED)")


def _zero_stage(deepspeed: dict[str, Any]) -> int:
    if deepspeed.get("deepspeed_config_file"):
        try:
            file_config = json.loads(Path(deepspeed["deepspeed_config_file"]).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise GQAConvertError(f"cannot read {deepspeed['deepspeed_config_file']}: {error}") from None
        return int((file_config.get("zero_optimization") or {}).get("stage", 0))
    return int(deepspeed.get("zero_stage", 0))


def resolve_strategy(settings: TrainSettings) -> str:
    """The strategy in effect: ddp, fsdp2 or deepspeed (GQAConvertError when it cannot run here)."""
    path = settings.accelerate_config or ""
    config = read_accelerate_config(settings.accelerate_config)
    from_config = strategy_of_config(config, path) if config else None
    strategy = settings.strategy
    if strategy == "auto":
        strategy = from_config or "ddp"
    elif from_config is not None and from_config != strategy:
        raise GQAConvertError(
            f"--strategy {strategy} conflicts with {path}, which asks for {from_config}: drop one of them"
        )
    precision = resolve_precision(settings.mixed_precision)
    if strategy == "deepspeed":
        _check_deepspeed(from_config)
    if strategy == "fsdp2" and precision == "fp16":
        raise GQAConvertError("--strategy fsdp2 trains in bf16 or fp32: use --mixed-precision bf16 or no")
    _warn_ignored(config, path, strategy, precision)
    return strategy


def _check_deepspeed(from_config: str | None) -> None:
    import torch

    if from_config != "deepspeed":
        raise GQAConvertError(
            "--strategy deepspeed needs its DeepSpeed settings: pass --accelerate-config configs/deepspeed_zero3.yaml"
        )
    if not torch.cuda.is_available():
        raise GQAConvertError("DeepSpeed needs GPUs and none is visible: use --strategy fsdp2 (it runs on CPU too)")
    if importlib.util.find_spec("deepspeed") is None:
        raise GQAConvertError("--strategy deepspeed needs the deepspeed package: pip install deepspeed")


def _warn_ignored(config: dict[str, Any], path: str, strategy: str, precision: str) -> None:
    """Never silently: name what of the YAML this run does not apply."""
    ignored = []
    if "mixed_precision" in config and str(config["mixed_precision"]) != precision:
        ignored.append(f"mixed_precision {config['mixed_precision']} (--mixed-precision decides: {precision})")
    if strategy == "fsdp2":
        for key, applied in _FSDP_AS_APPLIED.items():
            value = (config.get("fsdp_config") or {}).get(key)
            if value is not None and _truthy(value) != applied:
                ignored.append(f"{key}: {value}")
    if ignored:
        warnings.warn(f"{path}: ignored: {'; '.join(ignored)}", stacklevel=2)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() not in ("false", "0", "no", "none", "")
