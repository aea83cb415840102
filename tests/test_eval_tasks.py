"""eval --tasks against lm-eval itself: its own command line on the same model folder and task (in a
subprocess; every metric and standard error equal), and on the real SmolLM2 GGUF; its own model
loading in process, on a task of the user's from --include-path with few-shot prompts; --baseline's
retention against two separate runs divided by hand; the shipped tasks' data against the script that
makes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gqa_convert.cli import app
from gqa_convert.evaluation import LOCAL_TASK_NAMES, LOCAL_TASKS, TaskEvalOptions, evaluate_tasks, format_scores

from real_model import smollm2_gguf

pytest.importorskip("lm_eval", reason="needs pip install 'gqa-convert[tasks]' (scripts/test.sh installs it)")

LIMIT, BATCH, SEED = 12, 4, 1234
ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
runner = CliRunner()


def lm_eval_cli(model_args: str, tasks: str, work: Path, limit: int = LIMIT) -> tuple[dict, dict[str, list[dict]]]:
    """`lm_eval --model hf ...` as its users run it: the results JSON it writes, and each task's samples."""
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", tasks,
        "--include_path", str(LOCAL_TASKS), "--device", "cpu", "--limit", str(limit),
        "--batch_size", str(BATCH), "--seed", str(SEED), "--output_path", str(work / "out"), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = (work / "out").rglob("results_*.json")
    samples = {}
    for task in tasks.split(","):
        (file,) = (work / "out").rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in file.read_text().splitlines()]
    return json.loads(written.read_text()), samples


def assert_same_scores(ours: dict, theirs: dict, tasks: list[str], limit: int = LIMIT) -> None:
    for task in tasks:
        row, reference = ours["tasks"][task], theirs["results"][task]
        expected = {key.split(",")[0]: value for key, value in reference.items() if key.endswith(",none")}
        assert row["metrics"], task
        for metric, value in row["metrics"].items():
            assert value == expected[metric], (task, metric, value, expected[metric])
            assert row["stderr"][metric] == expected[f"{metric}_stderr"], (task, metric)
        assert set(row["metrics"]) == {key for key in expected if not key.endswith("_stderr")}
        assert row["samples"] == theirs["n-samples"][task]["effective"] == limit


def assert_same_samples(ours: dict, theirs: dict[str, list[dict]]) -> None:
    """Every example's log-likelihoods (of every choice) and metric values, exactly (lm-eval's samples
    file writes each response's numbers as strings: repr, so exact)."""
    for task, examples in theirs.items():
        mine = {example["doc_id"]: example for example in ours["samples"][task]}
        assert sorted(mine) == sorted(example["doc_id"] for example in examples)
        for example in examples:
            written = [[float(loglikelihood), greedy == "True"] for loglikelihood, greedy in example["filtered_resps"]]
            assert mine[example["doc_id"]]["responses"] == written, (task, example["doc_id"])
            for metric, value in mine[example["doc_id"]]["metrics"].items():
                assert value == example[metric], (task, example["doc_id"], metric)


def test_scores_equal_lm_eval_command_line(task_model, tmp_path, monkeypatch):
    tasks = ",".join(LOCAL_TASK_NAMES)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    ours = evaluate_tasks(task_model, TaskEvalOptions(tasks=tasks, limit=LIMIT, batch_size=BATCH, samples=True))
    assert list(here.iterdir()) == []  # eval writes nothing
    assert ours["dtype"] == "float32" and ours["device"] == "cpu" and ours["requested"] == list(LOCAL_TASK_NAMES)
    theirs, their_samples = lm_eval_cli(f"pretrained={task_model},dtype=float32", tasks, tmp_path)
    assert_same_scores(ours, theirs, list(LOCAL_TASK_NAMES))
    assert_same_samples(ours, their_samples)


def write_user_task(folder: Path) -> int:
    """A two-way choice task of the user's (which of two sentences follows), read by datasets' json builder."""
    sentences = [s.strip() + "." for s in (ROOT / "tests/data/sample.txt").read_text().split(".") if len(s.split()) > 3]
    rows = [
        {"context": sentences[i], "choices": [sentences[i + 1], sentences[(i + 7) % len(sentences)]], "label": i % 2}
        for i in range(len(sentences) - 1)
    ]
    for row in rows:  # the true next sentence first or second, alternately
        if row["label"] == 1:
            row["choices"].reverse()
    folder.mkdir()
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "user_pairs.yaml").write_text(
        "task: user_pairs\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n  cache_dir: {folder / 'cache'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    return len(rows)


def test_a_user_task_equals_lm_eval_loading_the_model_itself(task_model, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "user-tasks"
    rows = write_user_task(folder)
    options = TaskEvalOptions(tasks="user_pairs", include_path=(folder,), num_fewshot=2, limit=LIMIT, batch_size=BATCH)
    ours = evaluate_tasks(task_model, options)
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(task_model), "dtype": "float32"},
        tasks=["user_pairs"],
        num_fewshot=2,
        limit=LIMIT,
        batch_size=BATCH,
        device="cpu",
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=False,
        random_seed=SEED,
        numpy_random_seed=SEED,
        torch_random_seed=SEED,
        fewshot_random_seed=SEED,
    )
    assert_same_scores(ours, theirs, ["user_pairs"], limit=min(rows, LIMIT))
    assert ours["tasks"]["user_pairs"]["num_fewshot"] == theirs["n-shot"]["user_pairs"] == 2


def test_baseline_retention_equals_separate_runs_divided(task_model, other_task_model):
    tasks = ",".join(LOCAL_TASK_NAMES)
    args = ["eval", str(other_task_model), "--tasks", tasks, "--baseline", str(task_model), "--limit", str(LIMIT)]
    result = runner.invoke(app, [*args, "--batch-size", str(BATCH), "--json"])
    assert result.exit_code == 0, result.output
    both = json.loads(result.stdout)
    # the baseline, run second in the same process, scores as it does alone
    alone = evaluate_tasks(task_model, TaskEvalOptions(tasks=tasks, limit=LIMIT, batch_size=BATCH))
    assert both["baseline"]["tasks"] == alone["tasks"]
    converted, baseline = both["converted"], both["baseline"]
    assert both["converted"]["model"] == str(other_task_model) and both["baseline"]["model"] == str(task_model)
    accuracies = []
    for task in LOCAL_TASK_NAMES:
        for metric, value in converted["tasks"][task]["metrics"].items():
            base = baseline["tasks"][task]["metrics"][metric]
            expected = None if base == 0 else value / base * 100
            assert both["retention"][task][metric] == pytest.approx(expected), (task, metric)
        accuracies.append((converted["tasks"][task]["metrics"]["acc"], baseline["tasks"][task]["metrics"]["acc"]))
    mean_converted = sum(c for c, _ in accuracies) / len(accuracies)
    mean_baseline = sum(b for _, b in accuracies) / len(accuracies)
    assert both["converted"]["average"]["value"] == pytest.approx(mean_converted)
    assert both["baseline"]["average"]["value"] == pytest.approx(mean_baseline)
    assert both["average_retention"] == pytest.approx(mean_converted / mean_baseline * 100)
    kept = both["retention"]["wikitext_nextsentence"]["acc_norm"]
    assert kept != pytest.approx(100)  # two different models: not every ratio is 1

    table = format_scores(both)  # what eval prints without --json
    assert f"{kept:.1f}%" in table and f"{both['average_retention']:.1f}% (of the averages)" in table
    if both["retention"]["wikitext_lastword"]["acc"] is None:  # a random model guesses no word: 0 / 0
        assert "n/a" in table


def test_local_tasks_data():
    for name in LOCAL_TASK_NAMES:
        rows = {
            split: [json.loads(line) for line in (LOCAL_TASKS / f"{name}.{split}.jsonl").read_text().splitlines()]
            for split in ("test", "fewshot")
        }
        assert len(rows["test"]) == 300 and len(rows["fewshot"]) == 16
        assert not {json.dumps(row) for row in rows["test"]} & {json.dumps(row) for row in rows["fewshot"]}
        for row in rows["test"]:
            if "target" in row:  # last word: a content word that occurs earlier in the passage
                assert row["target"].isalpha() and row["target"].lower() in row["context"].lower()
            else:
                assert len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
    assert sum(path.stat().st_size for path in LOCAL_TASKS.iterdir() if path.is_file()) < 1_000_000
    notes = (LOCAL_TASKS / "README.md").read_text()
    assert "CC BY-SA" in notes and "Merity" in notes


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="needs the WikiText-2 raw test split")
def test_the_script_remakes_the_shipped_data_exactly(tmp_path):
    script = ROOT / "scripts/research/make_local_tasks.py"
    done = subprocess.run(
        [sys.executable, str(script), "--wikitext", str(WIKITEXT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for made in sorted(tmp_path.glob("*.jsonl")):
        assert made.read_bytes() == (LOCAL_TASKS / made.name).read_bytes(), made.name
    assert len(list(tmp_path.glob("*.jsonl"))) == 2 * len(LOCAL_TASK_NAMES)


@pytest.mark.slow
def test_gguf_scores_equal_lm_eval_command_line(tmp_path):
    gguf = smollm2_gguf()
    tasks = ",".join(LOCAL_TASK_NAMES)
    ours = evaluate_tasks(gguf, TaskEvalOptions(tasks=tasks, limit=8, batch_size=BATCH, samples=True))
    model_args = f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32"
    theirs, their_samples = lm_eval_cli(model_args, tasks, tmp_path, limit=8)
    assert_same_scores(ours, theirs, list(LOCAL_TASK_NAMES), limit=8)
    assert_same_samples(ours, their_samples)
    assert ours["tasks"]["wikitext_lastword"]["metrics"]["acc"] > 0  # a real model gets words right
