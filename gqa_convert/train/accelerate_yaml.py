"""The Accelerate YAML a user may give (--accelerate-config), read once before anything starts: every
value gqa-convert reads or hands to `accelerate launch` is of the type and range Accelerate expects,
or the run is refused in one line (a folder, a binary file, `num_processes: two`, `fsdp_config: [1, 2]`,
an unknown key or distributed_type...)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gqa_convert.errors import GQAConvertError, one_line

MAX_YAML_BYTES = 1 << 20
_SUPPORTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED")
# keys whose values gqa-convert reads or passes on: (type, lowest value, highest value)
_NUMBERS = {"num_processes": (1, None), "num_machines": (1, None), "machine_rank": (0, None)}
_NUMBERS["main_process_port"] = (1, 65535)
_MAPPINGS = ("fsdp_config", "deepspeed_config", "dynamo_config", "fp8_config", "parallelism_config")
_FLAGS = ("use_cpu", "debug", "same_network", "enable_cpu_affinity", "tpu_use_cluster", "tpu_use_sudo")


@dataclass(frozen=True)
class AccelerateConfig:
    """An Accelerate YAML, checked: what gqa-convert reads of it."""

    path: str
    distributed_type: str = "NO"
    num_processes: int | None = None
    num_machines: int | None = None
    machine_rank: int | None = None
    mixed_precision: str | None = None
    fsdp: dict[str, Any] = field(default_factory=dict)
    fsdp_version: int = 1
    zero_stage: int | None = None


def _bad(path: str, what: str, label: str = "accelerate config") -> GQAConvertError:
    return GQAConvertError(f"{label} {path}: {what}")


def read_yaml_mapping(path: str, what: str = "an Accelerate YAML", label: str = "accelerate config") -> dict[str, Any]:
    """A small YAML (or JSON) file holding a mapping, or one line saying what it is instead."""
    file = Path(path)

    def bad(text: str) -> GQAConvertError:
        return _bad(path, text, label)

    if file.is_dir():
        raise bad(f"is a folder; give {what} file")
    if file.exists() and not file.is_file():  # a device or a pipe: never read to its end
        raise bad(f"is not a regular file; give {what} file")
    try:
        size = file.stat().st_size
        if size > MAX_YAML_BYTES:
            raise bad(f"has {size:,} bytes, too large for {what}")
        text = file.read_bytes().decode("utf-8")
        if "\0" in text:
            raise bad(f"is a binary file, not {what}")
        loaded = yaml.safe_load(text)
    except FileNotFoundError:
        raise bad("not found") from None
    except OSError as error:
        raise bad(f"cannot be read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise bad(f"is not a text file (UTF-8), not {what}") from None
    except (yaml.YAMLError, RecursionError) as error:
        raise bad(f"is not valid YAML ({one_line(error)[:120]})") from None
    if loaded is None:
        raise bad(f"is empty, not {what}")
    if not isinstance(loaded, dict):
        raise bad(f"holds a {type(loaded).__name__}, not {what} (a mapping with distributed_type)")
    return loaded


def read_accelerate_config(path: str) -> AccelerateConfig:
    """The YAML's values, each of the type and range Accelerate expects: refused in one line otherwise."""
    config = read_yaml_mapping(path)
    _check_known_keys(config, path)
    kind = config.get("distributed_type", "NO")
    if not isinstance(kind, str):
        raise _bad(
            path, f'distributed_type must be a string such as "NO" (in quotes: YAML reads NO as false), not {kind!r}'
        )
    if kind.upper() not in _SUPPORTED_TYPES:
        raise _bad(path, f"distributed_type {kind} is not supported (use {', '.join(_SUPPORTED_TYPES)})")
    numbers = {}
    for key, (low, high) in _NUMBERS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(path, f"{key} must be an integer, not {value!r}")
        if value < low or (high is not None and value > high):
            raise _bad(path, f"{key} {value} is out of range ({low}..{high or 'any'})")
        numbers[key] = value
    for key in _MAPPINGS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise _bad(path, f"{key} must be a mapping of settings, not {config[key]!r:.60}")
    for key in _FLAGS:
        if key in config and not isinstance(config[key], bool):
            raise _bad(path, f"{key} must be true or false, not {config[key]!r:.60}")
    precision = config.get("mixed_precision")
    if precision is not None and precision not in ("no", "fp16", "bf16", "fp8"):
        raise _bad(path, f"mixed_precision must be no, fp16, bf16 or fp8, not {precision!r:.60}")
    machines, rank = numbers.get("num_machines", 1), numbers.get("machine_rank", 0)
    if rank >= machines and machines > 1:
        raise _bad(path, f"machine_rank {rank} must be below num_machines {machines}")
    fsdp = _fsdp_settings(config.get("fsdp_config") or {}, path)
    return AccelerateConfig(
        path=path,
        distributed_type=kind.upper(),
        num_processes=numbers.get("num_processes"),
        num_machines=numbers.get("num_machines"),
        machine_rank=numbers.get("machine_rank"),
        mixed_precision=precision,
        fsdp=fsdp,
        fsdp_version=fsdp.get("fsdp_version", 1),
        zero_stage=_zero_stage(config.get("deepspeed_config") or {}, path),
    )


def _check_known_keys(config: dict[str, Any], path: str) -> None:
    """Accelerate refuses keys it does not know when it launches: refuse them before anything starts."""
    from accelerate.commands.config.config_args import ClusterConfig

    known = {f.name for f in dataclasses.fields(ClusterConfig)} | {"fp16", "dynamo_backend"}  # older spellings
    unknown = sorted(str(key) for key in config if key not in known)
    if unknown:
        raise _bad(path, f"unknown keys {', '.join(unknown)[:200]} (see `accelerate config` for the keys it takes)")


def _fsdp_settings(fsdp: dict[str, Any], path: str) -> dict[str, Any]:
    settings = {}
    for key, value in fsdp.items():
        if key == "fsdp_version":
            version = int(value) if isinstance(value, int | str) and str(value) in ("1", "2") else None
            if version is None or isinstance(value, bool):
                raise _bad(path, f"fsdp_config.fsdp_version must be 1 or 2, not {value!r:.60}")
            settings[key] = version
        elif isinstance(value, str) and value.lower() in ("true", "false"):
            settings[key] = value.lower() == "true"
        else:
            settings[key] = value
    return settings


def _zero_stage(deepspeed: dict[str, Any], path: str) -> int | None:
    """zero_stage of the YAML, or of the DeepSpeed JSON file it names."""
    if not deepspeed:
        return None
    if deepspeed.get("deepspeed_config_file"):
        file = deepspeed["deepspeed_config_file"]
        if not isinstance(file, str):
            raise _bad(path, f"deepspeed_config.deepspeed_config_file must be a path, not {file!r:.60}")
        loaded = read_yaml_mapping(file, "a DeepSpeed JSON config", "deepspeed_config_file")  # JSON is YAML
        section = loaded.get("zero_optimization") or {}
        stage = section.get("stage", 0) if isinstance(section, dict) else None
        where = f"{file}: zero_optimization.stage"
    else:
        stage = deepspeed.get("zero_stage", 0)
        where = "deepspeed_config.zero_stage"
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise _bad(path, f"{where} must be 0, 1, 2 or 3, not {json.dumps(stage, default=str)[:60]}")
    return stage
