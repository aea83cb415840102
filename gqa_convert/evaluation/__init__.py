"""Evaluation of a model as gqa-convert loads it (loading.py): perplexity on a text (perplexity.py),
and downstream tasks through lm-evaluation-harness (tasks.py, scored in scores.py), with small local
tasks that need no download (local_tasks/)."""

from gqa_convert.evaluation.loading import EVAL_DTYPES, compute_dtype, load_eval_model
from gqa_convert.evaluation.perplexity import EvalOptions, evaluate, perplexity_of
from gqa_convert.evaluation.scores import compare_scores, format_scores, retention
from gqa_convert.evaluation.tasks import LOCAL_TASK_NAMES, LOCAL_TASKS, TaskEvalOptions, evaluate_tasks

__all__ = [
    "EVAL_DTYPES",
    "LOCAL_TASKS",
    "LOCAL_TASK_NAMES",
    "EvalOptions",
    "TaskEvalOptions",
    "compare_scores",
    "compute_dtype",
    "evaluate",
    "evaluate_tasks",
    "format_scores",
    "load_eval_model",
    "perplexity_of",
    "retention",
]
