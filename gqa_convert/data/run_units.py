"""Running tokenization work units: in a pool of worker processes (each started from the light worker
module), or in this process when there is one unit or one process; a live count of tokens and
tokens/s (rich, on stderr), and an early stop once the units done hold enough tokens."""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from gqa_convert.data.units import WorkUnit, available_cores
from gqa_convert.data.worker import ShardJob, start_worker, tokenize_unit

_POLL_S = 0.2


@contextlib.contextmanager
def _display(enabled: bool, units: int) -> Iterator[Callable[[int, int], None]]:
    """A callable show(tokens, units_done) that updates a progress line (or does nothing)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:  # elsewhere (a log file, a pipe) it would only add a blank line
        yield lambda tokens, done: None
        return

    columns = (
        TextColumn("tokenizing"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} units"),
        TextColumn("{task.fields[tokens]:,} tokens, {task.fields[rate]:,.0f} tokens/s"),
        TimeElapsedColumn(),
    )
    started = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("tokenize", total=units, tokens=0, rate=0.0)

        def show(tokens: int, done: int) -> None:
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=done, tokens=tokens, rate=rate)

        yield show


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["gqa_convert.data.worker"])  # workers fork from a process that has it
    return context


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Workers started meanwhile do not import the main module: for `gqa-convert` that is the whole
    command line (torch, transformers), some 300 MB per worker that tokenizing never uses."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: vars(main)[name] for name in ("__file__", "__spec__") if name in vars(main)}
    vars(main).pop("__file__", None)
    main.__spec__ = None  # read by multiprocessing, which must find it
    try:
        yield
    finally:
        vars(main).update(saved)


def run_units(
    todo: list[WorkUnit],
    job: ShardJob,
    records: dict[int, dict[str, Any]],
    num_proc: int | None,
    progress: bool,
    enough: Callable[[], bool],
) -> None:
    """Tokenize the units into `records` (by unit index), in order, stopping once enough() is true."""
    if not todo or enough():
        return
    processes = min(num_proc or available_cores(), len(todo))
    context = _context()
    counter = context.Value("q", 0)
    with _display(progress, len(todo)) as show:
        if processes == 1:
            start_worker(job, counter, in_pool=False)
            for done, unit in enumerate(todo, 1):
                records[unit.index] = tokenize_unit(unit)
                show(counter.value, done)
                if enough():
                    return
            return
        with _without_main_module():
            pool = context.Pool(processes, initializer=start_worker, initargs=(job, counter))
        with pool:
            results = pool.imap(tokenize_unit, todo, chunksize=1)
            for done, unit in enumerate(todo):
                records[unit.index] = _next_result(results, lambda done=done: show(counter.value, done))
                show(counter.value, done + 1)
                if enough():
                    break  # leaving the block terminates the workers still busy


def _next_result(results: Any, waiting: Callable[[], None]) -> dict[str, Any]:
    while True:
        try:
            return results.next(timeout=_POLL_S)
        except multiprocessing.TimeoutError:
            waiting()
