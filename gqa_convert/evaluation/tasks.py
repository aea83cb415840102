"""Downstream tasks through EleutherAI's lm-evaluation-harness (the optional extra: pip install
'gqa-convert[tasks]'), run on the model as gqa-convert loads it: the loaded model and tokenizer are
handed to lm-eval's HFLM, so a .gguf file is scored as the converter reads it, nothing is loaded twice,
and no model is downloaded. Task names are resolved, and their data loaded, before any model is."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.evaluation.loading import EVAL_DTYPES, load_eval_model
from gqa_convert.evaluation.scores import compare_scores, example_scores, task_scores
from gqa_convert.io.sources import model_config
from gqa_convert.options import Options, option

INSTALL_HINT = "pip install 'gqa-convert[tasks]'"
MIN_LM_EVAL = "0.4.12"  # the first release whose TaskManager.load takes built tasks
LOCAL_TASKS = Path(__file__).resolve().parent / "local_tasks"
LOCAL_TASK_NAMES = tuple(sorted(path.stem for path in LOCAL_TASKS.glob("*.yaml")))
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_GLOB = frozenset("*?[")


@dataclass(frozen=True, kw_only=True)
class TaskEvalOptions(Options):
    """`eval --tasks`: which lm-eval tasks, and how they are scored."""

    tasks: tuple[str, ...] = option(
        (),
        help=f"lm-eval task, group or tag names, comma-separated ({INSTALL_HINT}); shipped, offline: "
        + ",".join(LOCAL_TASK_NAMES),
        metavar="NAMES",
    )
    include_path: tuple[str, ...] = option((), help="with --tasks: a folder of lm-eval task YAML files of your own")
    limit: int | None = option(None, help="with --tasks: only the first N examples of each task (a quick check)", min=1)
    num_fewshot: int | None = option(None, help="with --tasks: examples per prompt (default: the task's)", min=0)
    seed: int = option(
        1234, help="with --tasks: lm-eval's python, numpy, torch and few-shot seeds", min=0, max=2**32 - 1
    )
    batch_size: int = option(4, help="requests per forward pass", min=1, cli=False)
    device: str | None = option(None, help="default: cuda when available, else cpu", cli=False)
    dtype: str = option(
        "auto", help="auto: the checkpoint's dtype on a GPU, float32 on a CPU", choices=EVAL_DTYPES, cli=False
    )
    samples: bool = option(False, help="keep every example's scores in the result", cli=False)

    def __post_init__(self) -> None:
        # Python callers and the command line may give "a,b" (or ["a,b", "c"]) and one folder as text
        tasks, paths = self.tasks, self.include_path
        if isinstance(tasks, str):
            tasks = (tasks,)
        if isinstance(tasks, Sequence) and all(isinstance(name, str) for name in tasks):
            tasks = tuple(name.strip() for text in tasks for name in text.split(","))
        object.__setattr__(self, "tasks", tasks)
        if isinstance(paths, str | Path):
            paths = (paths,)
        if isinstance(paths, Sequence) and all(isinstance(path, str | Path) for path in paths):
            paths = tuple(str(path) for path in paths)
        object.__setattr__(self, "include_path", paths)
        super().__post_init__()

    def check(self) -> None:
        if not all(self.tasks):
            raise GQAConvertError(
                f"--tasks needs names separated by commas, none empty (e.g. {','.join(LOCAL_TASK_NAMES)})"
            )
        repeated = sorted({name for name in self.tasks if self.tasks.count(name) > 1})
        if repeated:
            raise GQAConvertError(f"--tasks names {', '.join(repeated)} more than once: name each task once")
        for path in self.include_path:
            if not Path(path).is_dir():
                raise GQAConvertError(
                    f"--include-path {path} is not a folder: give a folder of lm-eval task YAML files"
                )
        if self.device is not None and not self.device.strip():
            raise GQAConvertError("--device must name a torch device, e.g. cpu, cuda or cuda:1")


def require_lm_eval() -> Any:
    """The lm_eval module, or one line naming the install command."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise GQAConvertError(f"--tasks needs EleutherAI's lm-evaluation-harness: {INSTALL_HINT}") from None
    if not hasattr(TaskManager, "load"):
        version = getattr(lm_eval, "__version__", "?")
        raise GQAConvertError(
            f"lm-eval {version} is too old (gqa-convert needs {MIN_LM_EVAL} or newer): {INSTALL_HINT}"
        )
    return lm_eval


@contextlib.contextmanager
def _lm_eval_quiet() -> Iterator[None]:
    """lm-eval's notices (e.g. that the model came pre-loaded, as it does here) are not the user's
    business; its errors and progress bars stay."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _NotIndexed(Exception):
    """A name (or a group's member) the quick index, of the local and --include-path tasks only, lacks."""


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], defaults: bool) -> Any:
    """lm-eval's index of the task files under `paths` (and its own thousands, with `defaults`), made
    once per process: indexing lm-eval's own files takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


class TaskCatalog:
    """The requested tasks, resolved once: names checked, data loadable, before any model is loaded.
    The quick index holds only the shipped and --include-path tasks; lm-eval's own task files are
    indexed only when a name (or a group's member) needs them."""

    def __init__(self, options: TaskEvalOptions) -> None:
        paths = (str(LOCAL_TASKS), *(str(Path(path).resolve()) for path in options.include_path))
        self.names = options.tasks
        try:
            self.manager = _task_manager(paths, defaults=False)
            self.first = self.build()
        except _NotIndexed:
            self.manager = _task_manager(paths, defaults=True)
            self.first = self.build(final=True)

    def build(self, final: bool = False) -> list[Any]:
        """Fresh lm-eval Task/Group objects for every requested name (tags expanded)."""
        built: list[Any] = []
        for name in self._expanded(final):
            try:
                loaded = self.manager.load([name])
            except Exception as error:  # lm-eval and datasets raise many types for a task they cannot load
                # a group of the user's may name lm-eval's own tasks, which only the full index holds;
                # data that cannot be read (OSError) is not found there either
                if not final and not isinstance(error, OSError):
                    raise _NotIndexed(name) from None
                raise GQAConvertError(_load_failure(name, error)) from None
            if name in loaded["groups"]:
                built.append(loaded["groups"][name])
            elif name in loaded["tasks"]:
                built.append(loaded["tasks"][name])
            else:  # a tag: its tasks
                built.extend(loaded["tasks"].values())
        return built

    def _expanded(self, final: bool) -> list[str]:
        known = set(self.manager.all_tasks)
        expanded: list[str] = []
        for name in self.names:
            matches = self.manager.match_tasks([name]) if _GLOB & set(name) else [name] if name in known else []
            if not matches:
                if not final:
                    raise _NotIndexed(name)
                raise GQAConvertError(_unknown(name))
            expanded += [match for match in matches if match not in expanded]
        return expanded


def _unknown(name: str) -> str:
    return (
        f"unknown task '{name}': list lm-eval's tasks with `lm-eval ls tasks`; gqa-convert ships "
        f"{', '.join(LOCAL_TASK_NAMES)} (no download needed); add your own task YAML folder with --include-path "
        "(lm-eval's own tasks fetch their data from the Hugging Face Hub)"
    )


def _load_failure(name: str, error: BaseException) -> str:
    offline = [
        variable for variable in _OFFLINE_VARIABLES if os.environ.get(variable, "0").lower() not in ("", "0", "false")
    ]
    why = f"{' and '.join(offline)} set" if offline else "is the Hub reachable?"
    return (
        f"task '{name}' could not be loaded ({type(error).__name__}: {one_line(error)[:300]}); tasks whose data "
        f"lives on the Hugging Face Hub need it ({why}); offline, run the shipped {', '.join(LOCAL_TASK_NAMES)} "
        "or your own tasks with --include-path"
    )


def _run(lm_eval: Any, source: str | Path, tasks: list[Any], catalog: TaskCatalog, options: TaskEvalOptions) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM
    from rich.console import Console

    started = time.perf_counter()
    Console(stderr=True).log(f"scoring {source} on {len(tasks)} task(s)")
    loaded = load_eval_model(source, options.dtype, options.device, special_tokens=True)
    seed = options.seed
    with _lm_eval_quiet():
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=options.batch_size)
        try:
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=options.num_fewshot,
                limit=options.limit,
                task_manager=catalog.manager,
                log_samples=options.samples,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except torch.OutOfMemoryError:
            raise GQAConvertError(
                f"out of memory at --batch-size {options.batch_size} on {loaded.device}: lower it"
            ) from None
        except GQAConvertError:
            raise
        except ValueError as error:  # lm-eval's refusals of a setting (e.g. more few-shot examples than a task has)
            raise GQAConvertError(f"lm-eval could not run the tasks: {one_line(error)}") from None
        except AssertionError as error:  # lm-eval checks its inputs with assert
            raise GQAConvertError(
                f"lm-eval stopped on one of its checks ({one_line(error) or 'no message'}); e.g. an answer longer "
                f"than the model's context ({lm.max_length} tokens) fails it"
            ) from None
    scores = task_scores(raw, tasks)
    if options.samples:
        scores["samples"] = {
            task: [example_scores(example) for example in rows] for task, rows in raw["samples"].items()
        }
    return {
        "model": str(source),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": loaded.device,
        "lm_eval": getattr(lm_eval, "__version__", None),
        "limit": options.limit,
        "num_fewshot": options.num_fewshot,
        "batch_size": options.batch_size,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),  # loading and scoring
        **scores,
    }


def evaluate_tasks(
    model_path: str | Path, options: TaskEvalOptions, baseline: str | Path | None = None
) -> dict[str, Any]:
    """Score `model_path` (a transformers folder or a .gguf file) on the tasks. With `baseline` (the
    source model), score it too, on the same tasks and settings, and add the retention of each metric."""
    if not options.tasks:
        raise GQAConvertError(f"--tasks needs names separated by commas (e.g. {','.join(LOCAL_TASK_NAMES)})")
    lm_eval = require_lm_eval()
    model_config(model_path)  # both models checked before any task runs
    if baseline is not None:
        model_config(baseline)
    with _lm_eval_quiet():
        catalog = TaskCatalog(options)
    converted = _run(lm_eval, model_path, catalog.first, catalog, options)
    if baseline is None:
        return converted
    with _lm_eval_quiet():
        tasks = catalog.build(final=True)
    return compare_scores(converted, _run(lm_eval, baseline, tasks, catalog, options))
