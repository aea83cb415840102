"""A worker's life: its process group and device, the checks that what runs is what the plan asks,
its end with the command that launched it, and its errors as one line for that command.

Accelerate starts the processes and the group (gloo on CPU, nccl on GPU); sharding is applied by the
strategy. What is in effect is checked against the plan: the world size, the strategy the launcher set
up, and OUT being the same folder on every machine. One process without a launcher gets a process
group of one, so every strategy runs the same code. A refused write (full disk, permission, read-only)
becomes one line naming the file, what is kept and what to do (`writing`)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gqa_convert.errors import GQAConvertError, is_disk_full
from gqa_convert.train.plan import TrainPlan
from gqa_convert.train.strategies import STRATEGIES

ERROR_ENV = "GQA_CONVERT_WORKER_ERROR"  # a file where a worker leaves its one-line error for the launcher
OWNER_ENV = "GQA_CONVERT_OWNER"  # process_identity() of the gqa-convert command the workers belong to


@dataclass
class Runtime:
    accelerator: Any
    device: torch.device
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_sharding() -> str | None:
    """What the environment set by `accelerate launch` asks Accelerate to apply itself."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    return None


def start(plan: TrainPlan) -> Runtime:
    """The Accelerator and process group of this worker; refuses anything but what the plan asks."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    settings, spec = plan.settings, STRATEGIES[plan.strategy]
    launcher = _launcher_sharding()
    if launcher != (spec.yaml_type if spec.launcher_applies else None):
        raise GQAConvertError(
            f"the launcher set up {launcher or 'no sharding'} but this run's strategy is {plan.strategy}: "
            "run gqa-convert uptrain directly, not under accelerate launch"
        )
    timeout = datetime.timedelta(minutes=settings.timeout_minutes)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda,
        # strategies gqa-convert applies set their precision themselves; Accelerate's own take it from Accelerate
        mixed_precision=plan.precision if spec.launcher_applies else "no",
        gradient_accumulation_steps=plan.grad_accum,
        log_with=None if settings.report_to == "none" else settings.report_to,
        project_dir=settings.out,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    if not dist.is_initialized():  # one process, no launcher
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    if not accelerator.num_processes == world == plan.world_size:
        # e.g. an Accelerator without cpu=True on a machine without GPUs sees 1 process in a group of 2
        raise GQAConvertError(
            f"asked for {plan.world_size} processes but Accelerate runs {accelerator.num_processes} in a process "
            f"group of {world}: check the launch settings"
        )
    in_effect = accelerator.distributed_type.value
    expected = (spec.yaml_type,) if spec.launcher_applies else ("NO", "MULTI_CPU", "MULTI_GPU")
    if in_effect not in expected:
        raise GQAConvertError(f"Accelerate set up {in_effect} but this run's strategy is {plan.strategy}")
    return Runtime(accelerator, accelerator.device, rank, world)


def stop(runtime: Runtime) -> None:
    """End trackers and the process group (left to the interpreter's exit, gloo's threads may abort it)."""
    runtime.accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()


def check_shared_out(runtime: Runtime, out: Path, wait_seconds: float = 10.0) -> None:
    """Rank 0 leaves a file with a fresh name in OUT; every process must find it. With separate OUT
    folders per machine, training would die later on a missing file or a checkpoint missing shards."""
    token = uuid.uuid4().hex if runtime.is_main else ""
    probe = out / f".visible-{token}"
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    names = [token]
    dist.broadcast_object_list(names, src=0)
    probe = out / f".visible-{names[0]}"
    deadline = time.monotonic() + wait_seconds  # network filesystems may show a new file late
    while not _reads(probe, names[0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = [None] * runtime.world
    dist.all_gather_object(seen, (socket.gethostname(), _reads(probe, names[0])))
    dist.barrier()
    if runtime.is_main:
        probe.unlink(missing_ok=True)
    blind = sorted({host for host, ok in seen if not ok})
    if blind:
        raise GQAConvertError(
            f"OUT {out} is not the same folder on every machine ({', '.join(blind)} cannot see what machine rank 0 "
            "writes there): put OUT on a filesystem shared by all machines"
        )


def _reads(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def die_with_parent(signal_number: int = signal.SIGKILL) -> None:
    """This process gets `signal_number` when its parent dies (Linux). Set in the launcher and in each
    worker: killing gqa-convert, even with SIGKILL, stops the whole run, where torch's launcher alone
    leaves workers, in sessions of their own, training on."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal_number)
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def process_identity(pid: int) -> str | None:
    """`pid:start time` of a running process (Linux), None once it has ended: the start time tells a
    reused pid apart, and a killed process not yet reaped (a zombie) counts as ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return f"{pid}:{fields[19]}"  # field 22 of proc(5): the start time


def follow_owner(poll_seconds: float = 0.5) -> None:
    """End this worker (SIGKILL) within `poll_seconds` of the gqa-convert command that launched it
    (OWNER_ENV). The parent-death signal alone depends on the launcher between them dying too; a
    launcher slow to exit, or a worker still starting when it died (orphans may go to a subreaper,
    not to pid 1), would leave workers training for nobody."""
    owner = os.environ.get(OWNER_ENV)
    if not owner:
        return
    pid = int(owner.split(":")[0])
    if process_identity(pid) != owner:
        os._exit(1)

    def watch() -> None:
        while process_identity(pid) == owner:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="gqa-convert-owner", daemon=True).start()


def report_error(message: str) -> None:
    """Leave the error for the launching process, which prints it as one line (first writer wins)."""
    path = os.environ.get(ERROR_ENV)
    if not path:
        return
    try:
        with open(path, "x") as handle:
            handle.write(message)
    except OSError:
        pass  # another process of this machine reported first


# how torch.save's zip writer reports a write the filesystem refused (it loses the errno)
_WRITER_FAILURES = ("PytorchStreamWriter failed", "unexpected pos")


@contextlib.contextmanager
def writing(what: str, kept: str, rerun: str = "rerun with --resume", path: Path | None = None) -> Iterator[None]:
    """A full disk or a refused write becomes one line: what was not written (the file, else `path`),
    what is kept, the fix."""
    try:
        yield
    except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        cause = output_error(error)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        where = f": {cause.filename or path}" if cause.filename or path else ""
        action = "free space" if is_disk_full(cause) else "check the space and permissions of OUT"
        if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            action = "make OUT writable"
        raise GQAConvertError(f"{what} was not written ({reason}{where}); {kept}: {action} and {rerun}") from None


def output_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`, also inside torch.distributed.checkpoint's per-rank failures."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, GQAConvertError):
            return None  # already one line
        if isinstance(error, OSError):
            return error
        if isinstance(error, RuntimeError) and any(sign in str(error) for sign in _WRITER_FAILURES):
            return OSError(None, "a write failed")
        failures = getattr(error, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for failure in failures.values():
                found = output_error(failure[0] if isinstance(failure, tuple) else failure)
                if found is not None:
                    return found
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None
