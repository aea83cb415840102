"""eval --tasks as a hostile user runs it: the extra not installed, unknown and Hub-only task names
offline, include paths that are not folders or hold a broken task, bad numbers, both or neither of
--data/--tasks, flags that do not apply, a fake GGUF, a tokenizer larger than the model, a baseline
that does not exist. Each is one line on stderr and exit 2, before any model runs where possible."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gqa_convert.cli import app
from gqa_convert.errors import GQAConvertError
from gqa_convert.evaluation import LOCAL_TASK_NAMES, TaskEvalOptions, evaluate_tasks

from tiny_models import build_tiny, save_tiny_tokenizer

runner = CliRunner()
SAMPLE = Path(__file__).parent / "data" / "sample.txt"
OFFLINE = os.environ.get("HF_DATASETS_OFFLINE") == "1" and os.environ.get("HF_HUB_OFFLINE") == "1"


def refused(args: list, *fragments: str) -> str:
    """The command exits 2 with one line on stderr holding every fragment, and no traceback."""
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 2, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def test_without_the_extra_one_line_names_the_install(task_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    refused(["eval", task_model, "--tasks", "wikitext_lastword"], "pip install 'gqa-convert[tasks]'")
    with pytest.raises(GQAConvertError, match=r"gqa-convert\[tasks\]"):
        evaluate_tasks(task_model, TaskEvalOptions(tasks="wikitext_lastword"))


def test_an_lm_eval_too_old_is_named(task_model, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.delattr(TaskManager, "load")  # as in lm-eval 0.4.11 and older
    refused(["eval", task_model, "--tasks", "wikitext_lastword"], "too old", "0.4.12", "gqa-convert[tasks]")


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (dict(limit=0), "--limit"),
        (dict(limit=-3), "--limit"),
        (dict(limit=True), "--limit"),
        (dict(limit=2.5), "--limit"),
        (dict(num_fewshot=-1), "--num-fewshot"),
        (dict(batch_size=0), "--batch-size"),
        (dict(seed=-1), "--seed"),
        (dict(seed=2**32), "--seed"),
        (dict(dtype="int8"), "--dtype"),
        (dict(device=""), "--device"),
        (dict(samples="yes"), "samples"),
        (dict(tasks=""), "--tasks"),
        (dict(tasks=" , "), "--tasks"),
        (dict(tasks="wikitext_lastword,,wikitext_nextsentence"), "--tasks"),
        (dict(tasks="wikitext_lastword,wikitext_lastword"), "more than once"),
        (dict(tasks=[3]), "--tasks"),
        (dict(include_path="does/not/exist"), "is not a folder"),
        (dict(include_path=SAMPLE), "is not a folder"),
    ],
)
def test_options_refuse_bad_values(settings, fragment):
    with pytest.raises(GQAConvertError, match=fragment.replace("-", r"\-")):
        TaskEvalOptions(**{"tasks": "wikitext_lastword", **settings})


def test_options_normalise_names_and_paths(tmp_path):
    options = TaskEvalOptions(tasks=" wikitext_lastword , wikitext_nextsentence", include_path=str(tmp_path))
    assert options.tasks == ("wikitext_lastword", "wikitext_nextsentence")
    assert options.include_path == (str(tmp_path),)


def test_cli_bad_numbers_and_paths_are_one_line(task_model, tmp_path):
    refused(["eval", task_model, "--tasks", "wikitext_lastword", "--limit", 0], "--limit")
    refused(["eval", task_model, "--tasks", "wikitext_lastword", "--num-fewshot", -1], "--num-fewshot")
    refused(["eval", task_model, "--tasks", "wikitext_lastword", "--include-path", tmp_path / "no"], "not a folder")
    refused(["eval", task_model], "--data", "--tasks")
    refused(["eval", task_model, "--data", SAMPLE, "--tasks", "wikitext_lastword"], "one of them")
    refused(["eval", tmp_path / "missing", "--tasks", "wikitext_lastword"], "not found")


def test_unknown_task_says_how_to_find_names(task_model):
    line = refused(["eval", task_model, "--tasks", "wikitext_lastword,no_such_task_xyz"], "'no_such_task_xyz'")
    for fragment in ("lm-eval ls tasks", "--include-path", *LOCAL_TASK_NAMES, "Hub"):
        assert fragment in line


@pytest.mark.skipif(not OFFLINE, reason="needs HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 (scripts/test.sh sets them)")
def test_a_hub_task_offline_says_to_use_local_tasks(task_model):
    line = refused(["eval", task_model, "--tasks", "lambada_openai", "--limit", 2], "'lambada_openai'")
    assert "HF_HUB_OFFLINE" in line and "--include-path" in line and LOCAL_TASK_NAMES[0] in line


def test_a_broken_user_task_is_one_line(task_model, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "broken.yaml").write_text(
        f"task: broken_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gone.jsonl'}\n"
        "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{x}}'\ndoc_to_target: '{{y}}'\n"
    )
    refused(["eval", task_model, "--tasks", "broken_task", "--include-path", folder], "'broken_task'", "not be loaded")


def test_data_and_task_flags_that_do_not_apply_are_warned(task_model):
    args = ["eval", task_model, "--data", SAMPLE, "--seq-len", 64, "--limit", 3, "--baseline", task_model, "--json"]
    with pytest.warns(UserWarning) as caught:
        result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    warned = {str(warning.message) for warning in caught}
    assert {"--limit is ignored with --data", "--baseline is ignored with --data"} <= warned
    assert json.loads(result.stdout)["perplexity"] > 1


def test_a_fake_gguf_and_a_missing_baseline_stop_before_any_task(task_model, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    refused(["eval", fake, "--tasks", "wikitext_lastword"], str(fake))
    refused(["eval", task_model, "--tasks", "wikitext_lastword", "--baseline", tmp_path / "gone"], "not found")


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    folder = tmp_path / "model"
    build_tiny(folder, "llama")  # 128 embedding rows
    save_tiny_tokenizer(folder)  # 320 ids
    refused(["eval", folder, "--tasks", "wikitext_lastword", "--limit", 1], "gives ids up to 319", "is 128")
    refused(["eval", folder, "--data", SAMPLE, "--seq-len", 32], "gives ids up to 319")


def test_more_shots_than_a_task_has_is_one_line(task_model):
    refused(["eval", task_model, "--tasks", "wikitext_lastword", "--num-fewshot", 40, "--limit", 1], "lm-eval")


def test_a_glob_pattern_selects_the_shipped_tasks(task_model):
    result = evaluate_tasks(task_model, TaskEvalOptions(tasks="wikitext_*", limit=2, batch_size=8))
    assert result["requested"] == sorted(LOCAL_TASK_NAMES) and result["average"]["tasks"] == result["requested"]
