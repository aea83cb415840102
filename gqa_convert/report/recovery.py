"""The recovery curve: training loss and held-out perplexity against tokens trained, with the source
model's and the pooled starting point's perplexity as reference lines. `recovery_figure` is a pure
function of the metrics rows; `write_recovery_plot` draws OUT/metrics.jsonl into OUT/recovery.png,
atomically (a temporary file beside it, renamed). Needs matplotlib (the `plot` extra)."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.report.metrics import METRICS_FILE, MetricsRow, read_rows

RECOVERY_PNG = "recovery.png"
INSTALL = "pip install 'gqa-convert[plot]'"
MAX_POINTS = 4000  # loss points drawn; longer runs are averaged into this many bins
_warned: set[str] = set()


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise GQAConvertError(f"drawing recovery.png needs matplotlib: {INSTALL}") from None
    return matplotlib


def _tokens(value: float, _position: Any = None) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:g}"


def _binned(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """At most MAX_POINTS points: means over consecutive bins."""
    if len(xs) <= MAX_POINTS:
        return xs, ys
    size = -(-len(xs) // MAX_POINTS)
    chunks = range(0, len(xs), size)
    return [sum(xs[i : i + size]) / len(xs[i : i + size]) for i in chunks], [
        sum(ys[i : i + size]) / len(ys[i : i + size]) for i in chunks
    ]


def _smoothed(values: list[float]) -> list[float]:
    """Exponential moving average over about 2% of the points, bias-corrected at the start."""
    alpha = min(1.0, 50 / max(len(values), 1))
    average, weight, out = 0.0, 0.0, []
    for value in values:
        average = (1 - alpha) * average + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


def recovery_figure(rows: list[MetricsRow], title: str) -> Any:
    """A matplotlib Figure of the rows (no global pyplot state): the training loss above, the held-out
    perplexity (log scale) below when the run evaluated, with horizontal reference lines for the
    source model and the starting point."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    evaluated = [row for row in rows if row.eval_perplexity is not None]
    figure = Figure(figsize=(8, 6.5 if evaluated else 4), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if evaluated else 1, 1, sharex=True, squeeze=False)[:, 0]
    loss_axes = axes[0]
    trained = [row for row in rows if row.loss is not None]
    if trained:
        xs, ys = _binned([row.tokens for row in trained], [row.loss for row in trained])
        loss_axes.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8, label="training loss (per step)")
        loss_axes.plot(xs, _smoothed(ys), color="tab:blue", linewidth=2, label="training loss (smoothed)")
    distilled = [row for row in trained if row.distill_loss is not None]
    if distilled:
        xs, ys = _binned([row.tokens for row in distilled], [row.distill_loss for row in distilled])
        loss_axes.plot(xs, _smoothed(ys), color="tab:purple", linestyle="--", label="distillation loss (T² KL)")
    if not trained:
        loss_axes.text(0.5, 0.5, "no training step yet", transform=loss_axes.transAxes, ha="center")
    loss_axes.set_ylabel("loss (nats per token)")
    loss_axes.grid(alpha=0.3)
    if trained:
        loss_axes.legend(loc="best")
    if evaluated:
        _perplexity(axes[1], rows, evaluated)
    axes[-1].set_xlabel("tokens trained")
    axes[-1].xaxis.set_major_formatter(FuncFormatter(_tokens))
    axes[-1].set_xlim(left=0)
    figure.suptitle(title)
    return figure


def _perplexity(axes: Any, rows: list[MetricsRow], evaluated: list[MetricsRow]) -> None:
    from matplotlib.ticker import FuncFormatter

    axes.plot(
        [row.tokens for row in evaluated], [row.eval_perplexity for row in evaluated], "o-", color="tab:orange",
        label="held-out perplexity",
    )  # fmt: skip
    start = next((row.eval_perplexity for row in rows if row.step == 0 and row.eval_perplexity is not None), None)
    source = next((row.source_perplexity for row in rows if row.source_perplexity is not None), None)
    if start is not None:
        axes.axhline(start, color="tab:red", linestyle=":", linewidth=1.5, label=f"pooled start: {start:.2f}")
    if source is not None:
        axes.axhline(source, color="tab:green", linestyle="--", linewidth=1.5, label=f"source model: {source:.2f}")
    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _position: f"{value:g}")
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(plain)
    axes.tick_params(axis="y", which="minor", labelsize=7)
    axes.set_ylabel("held-out perplexity (log scale)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="best")
    latest = evaluated[-1]
    if start is not None and source is not None and start != source and latest.step > 0:
        closed = (start - latest.eval_perplexity) / (start - source)
        note = f"after {_tokens(latest.tokens)} tokens: {latest.eval_perplexity:.2f}, {closed:.0%} of the gap closed"
        axes.set_title(note, fontsize=9, loc="left", color="0.3")


def recovery_title(out: Path, model: str | None = None) -> str:
    """'Recovery of NAME (K kv heads)': the model trained (given, or recorded in OUT's provenance),
    its kv heads from its config (or OUT's); the folder's name when neither is known."""
    from gqa_convert.io.provenance import read_record

    record = read_record(out) or {}
    model = model or (record.get("uptrain") or {}).get("model")
    name = Path(str(model)).name if model else out.resolve().name
    kv = None
    for folder in [Path(str(model))] * bool(model) + [out]:
        with contextlib.suppress(Exception):  # a title never stops a run or a plot
            from gqa_convert.planning.shapes import read_config

            config = read_config(folder)
            kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
            break
    return f"Recovery of {name}" + (f" ({kv} kv head{'s' if kv != 1 else ''})" if kv else "")


def write_recovery_plot(out: Path, model: str | None = None) -> Path:
    """Draw OUT/metrics.jsonl into OUT/recovery.png; returns the file's path."""
    rows = read_rows(out / METRICS_FILE)
    figure = recovery_figure(rows, recovery_title(out, model))
    target = out / RECOVERY_PNG
    staged = out / f".{RECOVERY_PNG}.{os.getpid()}.tmp"
    try:
        figure.savefig(staged, format="png")
        staged.replace(target)
    except OSError as error:
        staged.unlink(missing_ok=True)
        raise GQAConvertError(f"{target} was not written: {error.strerror or one_line(error)}") from None
    return target


def plot_run(out: Path) -> Path:
    """`gqa-convert plot OUT`: redraw the recovery curve of an uptrain output folder. Only a folder
    this tool wrote receives the file (the output guard's rule)."""
    from gqa_convert.io.output import foreign_entries

    if not (out / METRICS_FILE).is_file():
        raise GQAConvertError(f"{out / METRICS_FILE} not found: give the output folder of an uptrain run")
    foreign = foreign_entries(out)
    if foreign:
        raise GQAConvertError(
            f"{out} holds files gqa-convert did not write ({', '.join(foreign[:3])}): recovery.png is written "
            "only into an uptrain output folder"
        )
    return write_recovery_plot(out)


def refresh_recovery_plot(out: Path, model: str | None = None) -> None:
    """For a running training: redraw, or warn once (per reason) and carry on."""
    try:
        write_recovery_plot(out, model)
    except GQAConvertError as error:
        reason = "matplotlib" if INSTALL in str(error) else "write"
        if reason not in _warned:
            _warned.add(reason)
            what = f"not installed: {INSTALL}" if reason == "matplotlib" else str(error)
            warnings.warn(f"recovery.png is not drawn ({what}); training goes on", stacklevel=2)
