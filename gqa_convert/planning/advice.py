"""The smallest changes of a run's settings that make its step fit a device's memory.

Each lever is tried alone first, at its mildest value that fits: a smaller micro-batch (the global
batch kept by more accumulation), gradient checkpointing, a sharded strategy, more GPUs (sharded
strategies only: ddp holds the whole model on every GPU), training the attention only. When no single
lever fits, combinations of two, then three, then all of them, each with the fewest GPUs that fit.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gqa_convert.planning.memory import MemoryPlan, StepSetup, plan_memory
from gqa_convert.planning.shapes import ModelShape

MAX_GPUS = 4096
MAX_SCANNED = 4096  # micro-batches up to this are tried one by one, larger ones by halving


@dataclass(frozen=True)
class Change:
    flags: str  # what to pass, e.g. "--strategy fsdp2 --num-processes 16"
    plan: MemoryPlan


Fits = Callable[[StepSetup], MemoryPlan | None]


def _micro_batches(setup: StepSetup) -> Iterator[tuple[StepSetup, str]]:
    """Smaller micro-batches, largest first, each with the accumulation that keeps the global batch."""
    per_step = setup.micro_batch * setup.grad_accum
    if setup.micro_batch <= MAX_SCANNED:
        candidates = range(setup.micro_batch - 1, 0, -1)
    else:  # halvings only: a scan would take as long as the number is large
        candidates = [setup.micro_batch >> shift for shift in range(1, setup.micro_batch.bit_length())]
    for micro in candidates:
        if per_step % micro == 0:
            accum = per_step // micro
            yield (
                dataclasses.replace(setup, micro_batch=micro, grad_accum=accum),
                (f"--micro-batch-size {micro} --grad-accum {accum}"),
            )


def _checkpointing(setup: StepSetup) -> Iterator[tuple[StepSetup, str]]:
    if not setup.checkpointing:
        yield dataclasses.replace(setup, checkpointing=True), "--gradient-checkpointing"


def _strategies(setup: StepSetup) -> Iterator[tuple[StepSetup, str]]:
    sharded = ("fsdp2", "deepspeed") if setup.device == "cuda" else ("fsdp2",)
    for strategy in sharded:
        if strategy != setup.strategy and not (strategy == "fsdp2" and setup.precision == "fp16"):
            yield dataclasses.replace(setup, strategy=strategy), f"--strategy {strategy}"


def _attention_only(setup: StepSetup) -> Iterator[tuple[StepSetup, str]]:
    if setup.trainable != "attention":
        yield dataclasses.replace(setup, trainable="attention"), "--trainable attention"


def _more_gpus(setup: StepSetup) -> Iterator[tuple[StepSetup, str]]:
    """A marker: the number of GPUs is searched (the fewest that fit), not enumerated."""
    yield setup, ""


LEVERS = (_micro_batches, _checkpointing, _strategies, _more_gpus, _attention_only)


def _fewest_gpus(setup: StepSetup, per_machine: int, fits: Fits) -> tuple[str, MemoryPlan] | None:
    """The fewest GPUs (whole machines when the run spans several) over which a sharded step fits."""
    if setup.strategy == "ddp":
        return None  # every GPU holds the whole model
    step = per_machine if per_machine > 1 else 1
    candidates = range(setup.world + step, MAX_GPUS + 1, step)
    low, high, found = 0, len(candidates) - 1, None
    while low <= high:  # the memory per GPU falls as the GPUs grow
        middle = (low + high) // 2
        plan = fits(dataclasses.replace(setup, world=candidates[middle]))
        if plan is None:
            low = middle + 1
        else:
            found, high = (candidates[middle], plan), middle - 1
    if found is None:
        return None
    world, plan = found
    machines = f" ({world // per_machine} machines of {per_machine} GPUs)" if per_machine > 1 else ""
    return f"--num-processes {world}{machines}", plan


def smallest_changes(
    shape: ModelShape,
    setup: StepSetup,
    available: int,
    teacher: ModelShape | None = None,
    per_machine: int = 1,
    limit: int = 5,
) -> list[Change]:
    """Changes (up to `limit`) after which the step's memory with its margin fits `available` bytes:
    every single lever that fits, else the first combinations of two, then three... that do."""

    def fits(candidate: StepSetup) -> MemoryPlan | None:
        plan = plan_memory(shape, candidate, teacher)
        return plan if plan.required <= available else None

    for size in range(1, len(LEVERS) + 1):
        found = []
        for levers in itertools.combinations(LEVERS, size):
            change = _combined(setup, levers, per_machine, fits)
            if change is not None:
                found.append(change)
        if found:
            return found[:limit]
    return []


def _combined(setup: StepSetup, levers: tuple, per_machine: int, fits: Fits) -> Change | None:
    """The mildest values of these levers together that fit (each lever's options mildest first)."""
    searched = _more_gpus in levers
    options = [list(lever(setup)) for lever in levers if lever is not _more_gpus]
    if any(not option for option in options):
        return None
    for chosen in itertools.product(*options):
        candidate = setup
        for changed, _ in chosen:
            candidate = _merge(candidate, changed, setup)
        flags = [flag for _, flag in chosen]
        if searched:
            more = _fewest_gpus(candidate, per_machine, fits)
            if more is not None:
                return Change(" ".join([*flags, more[0]]), more[1])
        else:
            plan = fits(candidate)
            if plan is not None:
                return Change(" ".join(flags), plan)
    return None


def _merge(current: StepSetup, changed: StepSetup, original: StepSetup) -> StepSetup:
    """Apply what `changed` changed relative to `original` onto `current`."""
    updates = {
        field.name: getattr(changed, field.name)
        for field in dataclasses.fields(StepSetup)
        if getattr(changed, field.name) != getattr(original, field.name)
    }
    return dataclasses.replace(current, **updates)
