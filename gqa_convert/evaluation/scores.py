"""lm-eval's results as gqa-convert reports them: each task's metrics, a main score per requested task,
their average, and, against a baseline, the retention the conversion literature reports
(TransMLA, MHA2MLA): converted / baseline x 100, per metric and for the average over tasks."""

from __future__ import annotations

from typing import Any

MAIN_METRICS = ("acc", "acc_norm")  # preferred, in order; else a task's first higher-is-better metric
RETENTION_RULE = (
    "retention = converted / baseline x 100 for metrics where higher is better (baseline / converted for "
    "lower-is-better ones, e.g. perplexity); the average is the mean of each requested task's main score, "
    "and its retention is that of the averages (not the mean of the per-task retentions)"
)


def _metric_name(key: str) -> str:
    """lm-eval keys its results 'metric,filter'; the default filter 'none' is left out."""
    metric, _, kept = key.partition(",")
    return metric if kept in ("", "none") else f"{metric},{kept}"


def _row(raw: dict[str, Any], name: str) -> dict[str, Any]:
    values = raw["results"].get(name, {})
    higher = raw.get("higher_is_better", {}).get(name, {})
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, (str, bool)):
            continue  # alias, name, sample_len
        metric = _metric_name(key)
        if metric.split(",")[0].endswith("_stderr"):
            base, _, kept = metric.partition(",")
            stderr[base.removesuffix("_stderr") + (f",{kept}" if kept else "")] = _number(value)
        else:
            metrics[metric] = float(value)
    best = {metric: bool(higher.get(metric.split(",")[0], True)) for metric in metrics}
    main = next((m for m in MAIN_METRICS if m in metrics), None)
    main = main or next((m for m in metrics if best[m]), None) or next(iter(metrics), None)
    samples = raw.get("n-samples", {}).get(name, {})
    return {
        "metrics": metrics,
        "stderr": {metric: stderr.get(metric) for metric in metrics},
        "higher_is_better": best,
        "main": main,
        "samples": samples.get("effective"),
        "num_fewshot": raw.get("n-shot", {}).get(name),
    }


def _number(value: Any) -> float | None:
    """lm-eval writes 'N/A' where it has no standard error."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def task_scores(raw: dict[str, Any], requested: list[Any]) -> dict[str, Any]:
    """Every task and group lm-eval scored, which of them were asked for (a group without an
    aggregate score stands for its subtasks), and the average of their main scores."""
    tasks = {name: _row(raw, name) for name in raw["results"]}
    subtasks = raw.get("group_subtasks", {})

    def top_level(name: str) -> list[str]:
        if tasks.get(name, {}).get("metrics") or not subtasks.get(name):
            return [name] if name in tasks else []
        return [leaf for child in subtasks[name] for leaf in top_level(child)]

    names = [getattr(item, "task_name", None) or item.name for item in requested]
    rows = [row for name in names for row in top_level(name)]
    return {"tasks": tasks, "requested": rows, "average": _average(tasks, rows)}


def example_scores(example: dict[str, Any]) -> dict[str, Any]:
    """One example as lm-eval logged it: its id, target, the responses scored (for a log-likelihood
    task, [log-likelihood, is-greedy] per choice) and each metric's value."""
    return {
        "doc_id": example["doc_id"],
        "target": example["target"],
        "responses": [
            list(response) if isinstance(response, tuple) else response for response in example["filtered_resps"]
        ],
        "metrics": {metric: example[metric] for metric in example.get("metrics", []) if metric in example},
    }


def _average(tasks: dict[str, Any], rows: list[str]) -> dict[str, Any] | None:
    counted = [name for name in rows if tasks[name]["main"] and tasks[name]["higher_is_better"][tasks[name]["main"]]]
    if not counted:
        return None
    value = sum(tasks[name]["metrics"][tasks[name]["main"]] for name in counted) / len(counted)
    return {"value": value, "tasks": counted, "metrics": sorted({tasks[name]["main"] for name in counted})}


def retention(converted: float, baseline: float, higher_is_better: bool = True) -> float | None:
    """Percent of the baseline's quality kept; None where the baseline (or converted) score is 0."""
    top, bottom = (converted, baseline) if higher_is_better else (baseline, converted)
    return None if bottom == 0 else 100.0 * top / bottom


def compare_scores(converted: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Both results and the retention of every metric both have, and of the average."""
    kept: dict[str, dict[str, float | None]] = {}
    for name, row in converted["tasks"].items():
        base = baseline["tasks"].get(name)
        if base is None:
            continue
        kept[name] = {
            metric: retention(value, base["metrics"][metric], row["higher_is_better"][metric])
            for metric, value in row["metrics"].items()
            if metric in base["metrics"]
        }
    average = None
    if converted["average"] and baseline["average"]:
        average = retention(converted["average"]["value"], baseline["average"]["value"])
    return {
        "converted": converted,
        "baseline": baseline,
        "retention": kept,
        "average_retention": average,
        "retention_rule": RETENTION_RULE,
    }


def _settings(result: dict[str, Any]) -> str:
    shots = sorted({str(result["tasks"][name]["num_fewshot"]) for name in result["requested"]})
    limit = "all examples" if result["limit"] is None else f"first {result['limit']} examples per task"
    where = f"{result['dtype']} on {result['device']}, lm-eval {result['lm_eval']}"
    return f"{where}, {'/'.join(shots)}-shot, {limit}, {result['seconds']:.0f} s"


def _value(value: float | None, width: int = 10) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.4f}"


def _percent(value: float | None) -> str:
    return f"{'n/a':>10}" if value is None else f"{value:>9.1f}%"


def format_scores(result: dict[str, Any]) -> str:
    """A table: one row per metric of each requested task, then the average (and retention)."""
    compared = "baseline" in result
    converted = result["converted"] if compared else result
    width = max([len(name) for name in converted["requested"]] + [len("task")]) + 2
    lines = [f"{converted['model']}: {_settings(converted)}"]
    if compared:
        lines.insert(1, f"baseline {result['baseline']['model']}: {_settings(result['baseline'])}")
        lines.append(f"{'task':<{width}}{'metric':<12}{'converted':>10}{'baseline':>10}{'retention':>11}")
    else:
        lines.append(f"{'task':<{width}}{'metric':<12}{'value':>10}{'stderr':>10}{'examples':>10}")
    for name in converted["requested"]:
        row = converted["tasks"][name]
        for index, (metric, value) in enumerate(row["metrics"].items()):
            label = name if index == 0 else ""
            if compared:
                base = result["baseline"]["tasks"].get(name, {}).get("metrics", {}).get(metric)
                kept = result["retention"].get(name, {}).get(metric)
                lines.append(f"{label:<{width}}{metric:<12}{_value(value)}{_value(base)}{' ' + _percent(kept)}")
            else:
                examples = f"{row['samples']:>10}" if index == 0 and row["samples"] is not None else ""
                lines.append(f"{label:<{width}}{metric:<12}{_value(value)}{_value(row['stderr'][metric])}{examples}")
    average = converted["average"]
    if average:
        label = f"average {'/'.join(average['metrics'])} over {len(average['tasks'])} tasks"
        if compared:
            base_average = result["baseline"]["average"]
            base = base_average["value"] if base_average else None
            kept = _percent(result["average_retention"])
            lines.append(f"{label:<{width + 12}}{_value(average['value'])}{_value(base)} {kept} (of the averages)")
        else:
            lines.append(f"{label:<{width + 12}}{_value(average['value'])}")
    return "\n".join(lines)
