"""The recovery curve: drawn from metrics.jsonl (reference lines from the step-0 row), read back
schema-checked, redrawn by `gqa-convert plot`, and written by a run that evaluates, with the
teacher's perplexity as the source's."""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest

from gqa_convert.cli import app
from gqa_convert.io.output import foreign_entries
from gqa_convert.report.metrics import MetricsRow, read_rows
from gqa_convert.report.recovery import recovery_figure, write_recovery_plot

from helpers import SAMPLE, fails, runner
from tiny_models import build_trainable


def _rows(steps: int = 200, evaluate_every: int = 50, source: bool = True) -> list[dict]:
    start = {"step": 0, "tokens": 0, "eval_perplexity": 80.0, "eval_tokens": 1000}
    if source:
        start["source_perplexity"] = 12.5
    rows = [start]
    for step in range(1, steps + 1):
        row = {"step": step, "tokens": step * 4096, "loss": 4 * math.exp(-step / 60) + 2.5, "lr": 1e-4}
        if step % evaluate_every == 0:
            row["eval_perplexity"] = 12.5 + 67.5 * math.exp(-step / 50)
        rows.append(row)
    return rows


def _write(folder, rows, extra_lines=()):
    folder.mkdir(exist_ok=True)
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _lines(axes) -> dict[str, object]:
    return {line.get_label(): line for line in axes.get_lines()}


def test_the_figure_draws_both_curves_and_the_reference_lines():
    rows = [MetricsRow(**{k: v for k, v in r.items() if k in MetricsRow.__slots__}) for r in _rows()]
    figure = recovery_figure(rows, "Recovery of tiny (1 kv heads)")
    loss_axes, perplexity_axes = figure.get_axes()
    assert figure.get_suptitle() == "Recovery of tiny (1 kv heads)"
    lines = _lines(perplexity_axes)
    assert set(lines) == {"held-out perplexity", "pooled start: 80.00", "source model: 12.50"}
    assert list(lines["pooled start: 80.00"].get_ydata()) == [80.0, 80.0]  # horizontal
    assert list(lines["source model: 12.50"].get_ydata()) == [12.5, 12.5]
    assert list(lines["held-out perplexity"].get_xdata()) == [0, 50 * 4096, 100 * 4096, 150 * 4096, 200 * 4096]
    assert perplexity_axes.get_yscale() == "log" and "perplexity" in perplexity_axes.get_ylabel()
    assert perplexity_axes.get_xlabel() == "tokens trained" and "nats per token" in loss_axes.get_ylabel()
    trained = _lines(loss_axes)["training loss (per step)"]
    assert len(trained.get_xdata()) == 200 and trained.get_ydata()[0] == pytest.approx(4 * math.exp(-1 / 60) + 2.5)
    assert loss_axes.get_legend() is not None and perplexity_axes.get_legend() is not None


def test_without_references_or_evaluations_only_what_exists_is_drawn():
    no_source = [MetricsRow(**{k: v for k, v in r.items() if k in MetricsRow.__slots__}) for r in _rows(source=False)]
    assert set(_lines(recovery_figure(no_source, "t").get_axes()[1])) == {"held-out perplexity", "pooled start: 80.00"}
    loss_only = [MetricsRow(step=s, tokens=s * 10, loss=3.0) for s in range(1, 5)]
    assert len(recovery_figure(loss_only, "t").get_axes()) == 1
    long_run = [MetricsRow(step=s, tokens=s, loss=1.0) for s in range(1, 20001)]
    drawn = _lines(recovery_figure(long_run, "t").get_axes()[0])["training loss (per step)"]
    assert len(drawn.get_xdata()) <= 4000  # binned


def test_the_plot_command_writes_a_png_that_decodes(tmp_path):
    from matplotlib.image import imread

    out = _write(tmp_path / "run", _rows())
    result = runner.invoke(app, ["plot", str(out)])
    assert result.exit_code == 0, result.output
    image = imread(out / "recovery.png")
    assert image.shape[:2] == (780, 960) and image.std() > 0.05  # 8 x 6.5 inches at 120 dpi, not blank
    assert foreign_entries(out) == []  # nothing left beside it


def test_tampered_lines_are_dropped_with_one_warning(tmp_path):
    bad = [
        '{"step": 201, "tokens": 823',
        '{"step": "x", "tokens": 1, "loss": 2}',
        '{"step": 202, "tokens": 5, "loss": NaN}',
    ]
    bad += ["[1, 2]", '{"step": 203, "tokens": -1, "loss": 1}', '{"step": 204, "tokens": 9}', "x" * (1 << 21), "\xff"]
    bad += ['{"step": 0, "tokens": 0, "eval_perplexity": -3}']
    out = _write(tmp_path / "run", _rows(), bad)
    with pytest.warns(UserWarning, match=r"dropped 9 unreadable line\(s\) \(line 202: not JSON and 8 more\)"):
        rows = read_rows(out / "metrics.jsonl")
    assert [row.step for row in rows] == list(range(201)) and rows[0].source_perplexity == 12.5
    assert rows[-1].loss == pytest.approx(4 * math.exp(-200 / 60) + 2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert write_recovery_plot(out).is_file()


def test_plot_refusals_are_one_line(tmp_path, monkeypatch):
    fails(["plot", tmp_path / "absent"], "metrics.jsonl not found", "uptrain")
    out = _write(tmp_path / "run", _rows(steps=3))
    (out / "notes.txt").write_text("mine")
    fails(["plot", out], "did not write (notes.txt)")  # a folder with someone else's files
    (out / "notes.txt").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    fails(["plot", out], "needs matplotlib", "pip install 'gqa-convert[plot]'")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_a_run_draws_its_recovery_curve_with_the_teachers_perplexity(tmp_path):
    """Oracle: the step-0 row holds the pooled model's and the teacher's perplexity on the held-out
    tokens, each equal to an evaluation of that model alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from gqa_convert.data.manifest import read_manifest
    from gqa_convert.data.tokens import read_head
    from gqa_convert.evaluation import perplexity_of
    from gqa_convert.train.launch import uptrain
    from gqa_convert.train.settings import TrainSettings

    build_trainable(tmp_path / "student")
    teacher = build_trainable(tmp_path / "teacher", num_key_value_heads=4)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.normal_(0, 0.05)
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "out"
    uptrain(
        TrainSettings(
            model=str(tmp_path / "student"), out=str(out), data=str(SAMPLE), eval_data=str(SAMPLE), eval_tokens=500,
            tokens=str(8 * 4 * 32), seq_len=32, micro_batch_size=4, eval_every=4, teacher=str(tmp_path / "teacher"),
        )
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_perplexity" in r] == [0, 4, 8]
    (eval_folder,) = [f for f in (out / "data").iterdir() if read_manifest(f)["job"]["head"]]
    ids = torch.from_numpy(read_head(eval_folder, 500))
    for key, folder in (("eval_perplexity", "student"), ("source_perplexity", "teacher")):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        assert rows[0][key] == pytest.approx(perplexity_of(model, ids, 32)["perplexity"], rel=1e-4), key
    assert (out / "recovery.png").is_file() and foreign_entries(out) == []
    figure_lines = _lines(recovery_figure(read_rows(out / "metrics.jsonl"), "t").get_axes()[1])
    assert f"source model: {rows[0]['source_perplexity']:.2f}" in figure_lines


def test_a_run_without_matplotlib_warns_once_and_trains(tmp_path, monkeypatch):
    from gqa_convert.report import recovery
    from gqa_convert.train.launch import uptrain
    from gqa_convert.train.settings import TrainSettings

    build_trainable(tmp_path / "model")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(recovery, "_warned", set())
    settings = TrainSettings(
        model=str(tmp_path / "model"), out=str(tmp_path / "out"), data=str(SAMPLE), eval_data=str(SAMPLE),
        eval_tokens=200, tokens=str(4 * 4 * 32), seq_len=32, micro_batch_size=4, eval_every=1,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"recovery.png is not drawn \(not installed: pip install") as caught:
        result = uptrain(settings)
    assert result["steps"] == 4 and not (tmp_path / "out" / "recovery.png").exists()
    assert sum("recovery.png" in str(w.message) for w in caught) == 1


def test_a_resume_keeps_the_curves_starting_point(tmp_path):
    """The step-0 row (the start and the source's reference, evaluated before training) is a record:
    trimming the log to a checkpoint on resume keeps it, without a warning about unreadable lines."""
    import warnings

    from gqa_convert.report.metrics import read_records
    from gqa_convert.train.metrics import trim_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "tokens": 0, "eval_perplexity": 50.0, "eval_tokens": 64, "source_perplexity": 20.0},
        {"step": 1, "tokens": 8, "loss": 3.0},
        {"step": 2, "tokens": 16, "loss": 2.5},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trim_metrics(path, 1)
    assert read_records(path) == rows[:2]


def test_a_diverged_step_is_written_as_standard_json_and_read_back(tmp_path):
    """A loss or perplexity that is not finite is written as null (NaN is not JSON), so the log passes
    its own schema: resume, the summary and the figure keep the step and draw only what is finite."""
    from types import SimpleNamespace

    from gqa_convert.report.metrics import read_records
    from gqa_convert.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, SimpleNamespace(trackers=[]), main=True)
    log.write({"step": 0, "tokens": 0, "eval_perplexity": 40.0, "source_perplexity": 20.0})
    log.write({"step": 1, "tokens": 8, "loss": 3.0, "grad_norm": 1.5, "lr": 1e-4})
    log.write({"step": 2, "tokens": 16, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4})
    log.write({"step": 3, "tokens": 24, "loss": 2.5, "lr": 1e-4, "eval_perplexity": float("inf")})

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not standard JSON")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=strict)["step"] for line in lines] == [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = read_records(tmp_path / "metrics.jsonl")
        rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r.get("loss") for r in records] == [None, 3.0, None, 2.5] and records[2]["grad_norm"] is None
    assert [row.eval_perplexity for row in rows] == [40.0, None, None, None]
    loss_line = _lines(recovery_figure(rows, "t").get_axes()[0])["training loss (per step)"]
    assert list(loss_line.get_xdata()) == [8, 24] and list(loss_line.get_ydata()) == [3.0, 2.5]
