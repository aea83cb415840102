"""Distributed strategies behind one seam: the registry (what each needs, how it is launched, its
checkpoint format) and the `Strategy` protocol the loop, the checkpoints and the export use.

    ddp        every process holds the whole model; gradients are averaged (also one process)
    fsdp2      torch's fully_shard on each decoder layer and on the root, applied by gqa-convert under
               a plain multi-process launch: the same code on CPU (gloo) and GPU (nccl)
    deepspeed  ZeRO-3 through Accelerate's DeepSpeed plugin (GPUs only)

Adding a strategy is one entry in STRATEGIES and one class implementing Strategy (a module of this
package, built by the worker from `implementation`). This module imports no torch: the plan is made
before any worker starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gqa_convert.errors import GQAConvertError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gqa_convert.train.accelerate_yaml import AccelerateConfig
    from gqa_convert.train.losses import Head


class Strategy(Protocol):
    """One way of laying the run over its processes."""

    model: nn.Module  # the student as wrapped: its forward returns the chunked LossParts
    teacher: nn.Module | None  # the frozen teacher, laid out like the student, or None

    def prepare(self) -> None:
        """Load the student (and teacher) into this strategy's layout, wrap it, build the optimizer."""

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def teacher_head(self) -> contextlib.AbstractContextManager[Head]: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> torch.Tensor | float | None:
        """Clip, step and zero the gradients; the gradient norm before clipping (may be a tensor still
        on the device: the loop reads it when it writes the step's record)."""

    def set_hyperparameters(self, lr: float) -> None:
        """This step's learning rate, and the run's weight decay (also over a resumed optimizer)."""

    def after_eval(self) -> None: ...
    def save_state(self, folder: Path) -> None:
        """Collective: the model and optimizer state into a checkpoint folder."""

    def load_state(self, folder: Path) -> None:
        """Collective: restore what save_state wrote (a damaged folder is one GQAConvertError)."""

    def export_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The trained model's tensors (sharded or not), in the same order on every process."""

    def full_shape(self, tensor: torch.Tensor) -> tuple[int, ...]: ...
    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Collective: the whole tensor (on the main process at least)."""

    def shares(self) -> dict[str, tuple[int, int]]:
        """(elements this process holds, elements in all) of parameters, optimizer state, teacher."""


@dataclass(frozen=True)
class StrategySpec:
    """What the plan and the launcher need to know of a strategy, before anything starts."""

    name: str
    help: str
    implementation: str  # "module:Class", imported by the workers only
    checkpoint_format: str  # "dcp": safetensors + JSON, resharded onto any process count; "deepspeed"
    yaml_type: str | None = None  # the Accelerate distributed_type that asks for it
    launcher_applies: bool = False  # Accelerate builds it from the YAML (else gqa-convert applies it)
    needs_gpu: bool = False
    package: str | None = None
    precisions: tuple[str, ...] = ("no", "bf16", "fp16")
    yaml_rule: Callable[[AccelerateConfig], None] | None = None  # what the YAML must say for it
    yaml_as_applied: dict[str, bool] = field(default_factory=dict)  # YAML settings it does not follow
    yaml_example: str | None = None  # a YAML of configs/ that sets it up


def _fsdp_version_2(config: AccelerateConfig) -> None:
    if config.fsdp_version != 2:
        raise GQAConvertError(
            f"{config.path} asks for FSDP version {config.fsdp_version}, which gqa-convert does not run: set "
            "fsdp_config.fsdp_version: 2 (gqa-convert then applies FSDP2 itself)"
        )


def _zero_stage_3(config: AccelerateConfig) -> None:
    if config.zero_stage != 3:
        raise GQAConvertError(
            f"{config.path} asks for DeepSpeed ZeRO stage {config.zero_stage}: gqa-convert runs stage 3 only"
        )


STRATEGIES: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec(
            "ddp",
            "every process holds the whole model",
            "gqa_convert.train.strategies.ddp:DataParallel",
            checkpoint_format="dcp",
        ),
        StrategySpec(
            "fsdp2",
            "parameters, gradients and optimizer state sharded (CPU or GPU)",
            "gqa_convert.train.strategies.fsdp2:FullyShard",
            checkpoint_format="dcp",
            yaml_type="FSDP",
            precisions=("no", "bf16"),
            yaml_rule=_fsdp_version_2,
            # gqa-convert shards fully, per decoder layer, reshards after forward, keeps parameters on the device
            yaml_as_applied={
                "fsdp_offload_params": False,
                "fsdp_reshard_after_forward": True,
                "fsdp_activation_checkpointing": False,
            },
        ),
        StrategySpec(
            "deepspeed",
            "ZeRO-3 (GPU)",
            "gqa_convert.train.strategies.deepspeed:DeepSpeedZero3",
            checkpoint_format="deepspeed",
            yaml_type="DEEPSPEED",
            launcher_applies=True,
            needs_gpu=True,
            package="deepspeed",
            yaml_rule=_zero_stage_3,
            yaml_example="configs/deepspeed_zero3.yaml",
        ),
    )
}
STRATEGY_CHOICES = ("auto", *STRATEGIES)


def chosen_strategy(asked: str, config: AccelerateConfig | None) -> StrategySpec:
    """--strategy, else the YAML's sharding, else ddp, with the rules that hold on any machine (a run
    may be planned on a laptop): the YAML's own rule, no contradiction, the YAML a strategy needs."""
    from_yaml = None
    if config is not None and config.distributed_type not in ("NO", "MULTI_GPU", "MULTI_CPU"):
        from_yaml = next((spec for spec in STRATEGIES.values() if spec.yaml_type == config.distributed_type), None)
        if from_yaml is None:
            raise GQAConvertError(
                f"{config.path}: distributed_type {config.distributed_type} is not supported (use NO, MULTI_GPU, "
                + ", ".join(spec.yaml_type for spec in STRATEGIES.values() if spec.yaml_type)
                + ")"
            )
        if from_yaml.yaml_rule is not None:
            from_yaml.yaml_rule(config)
    spec = (from_yaml or STRATEGIES["ddp"]) if asked == "auto" else STRATEGIES[asked]
    if from_yaml is not None and from_yaml is not spec:
        raise GQAConvertError(
            f"--strategy {asked} conflicts with {config.path}, which asks for {from_yaml.name}: drop one of them"
        )
    if spec.launcher_applies and from_yaml is not spec:
        raise GQAConvertError(
            f"--strategy {spec.name} needs its settings in an Accelerate YAML: pass --accelerate-config "
            f"{spec.yaml_example}"
        )
    return spec


def resolve_strategy(asked: str, config: AccelerateConfig | None, precision: str, cuda: bool) -> StrategySpec:
    """The strategy in effect (chosen_strategy), refused in one line when it cannot run here; YAML
    settings it does not apply are named in a warning."""
    spec = chosen_strategy(asked, config)
    if spec.needs_gpu and not cuda:
        raise GQAConvertError(
            f"the {spec.name} strategy needs GPUs and none is visible: use --strategy fsdp2 (it runs on CPU too)"
        )
    if spec.package and importlib.util.find_spec(spec.package) is None:
        raise GQAConvertError(f"the {spec.name} strategy needs the {spec.package} package: pip install {spec.package}")
    if precision not in spec.precisions:
        raise GQAConvertError(
            f"--strategy {spec.name} trains in {' or '.join(spec.precisions)}: use --mixed-precision "
            + " or ".join(p for p in spec.precisions)
        )
    _warn_ignored(config, spec, precision)
    return spec


def _warn_ignored(config: AccelerateConfig | None, spec: StrategySpec, precision: str) -> None:
    """Never silently: name what of the YAML this run does not apply."""
    if config is None:
        return
    ignored = []
    if config.mixed_precision is not None and config.mixed_precision != precision:
        ignored.append(f"mixed_precision {config.mixed_precision} (--mixed-precision decides: {precision})")
    for key, applied in spec.yaml_as_applied.items():
        value = config.fsdp.get(key)
        if value is not None and value != applied:
            ignored.append(f"{key}: {value}")
    if ignored:
        warnings.warn(f"{config.path}: ignored: {'; '.join(ignored)}", stacklevel=3)
