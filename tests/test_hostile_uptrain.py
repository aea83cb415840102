"""uptrain and its --resume tried as a hostile user would, one test per class of problem: checkpoint
files holding pickles (no code runs), checkpoint JSON and metrics lines tampered with, the resume
contract (what must stay), OUT that holds no run of this tool, Accelerate YAMLs of the wrong shape,
ids outside the vocabulary, writes the disk refuses, inputs inside OUT, two runs into one OUT. Each
refusal is one line and exit 2, and nothing of the user's changes."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from gqa_convert.cli import app
from gqa_convert.io.output import output_lock
from gqa_convert.report.metrics import read_records
from gqa_convert.train.checkpoint import newest_intact
from gqa_convert.train.launch import uptrain
from gqa_convert.train.settings import TrainSettings

from helpers import SAMPLE, fails, snapshot
from tiny_models import build_trainable, save_tiny_tokenizer, tiny_config

runner = CliRunner()
STEPS = 4
ARGS = ["--data", SAMPLE, "--seq-len", 32, "--micro-batch-size", 4, "--tokens", STEPS * 128, "--lr", 3e-3]
ARGS += ["--save-every", 2, "--keep-checkpoints", 3]
NEWEST = Path("checkpoints") / f"step-{STEPS:08d}"


def settings(model: Path, out: Path, **extra: object) -> TrainSettings:
    options = dict(data=str(SAMPLE), seq_len=32, micro_batch_size=4, tokens=STEPS * 128, lr=3e-3, save_every=2)
    return TrainSettings(model=str(model), out=str(out), **{**options, "keep_checkpoints": 3, **extra})


def invoke(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The student; an MHA teacher of another config; a model whose tokenizer outgrew config.vocab_size;
    a teacher of another vocabulary."""
    root = tmp_path_factory.mktemp("hostile-uptrain")
    build_trainable(root / "model", "llama")
    build_trainable(root / "teacher", "llama", num_key_value_heads=4)
    build_trainable(root / "grown", "llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "grown")
    tokenizer.add_tokens([f"<extra{i}>" for i in range(40)])
    tokenizer.save_pretrained(root / "grown")
    save_tiny_tokenizer(root / "wide", vocab_size=400)
    config = tiny_config("llama", vocab_size=400, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "wide")
    return {path.name: path for path in root.iterdir()}


@pytest.fixture(scope="module")
def finished(models, tmp_path_factory) -> Path:
    """4 steps, checkpoints of steps 2 and 4, exported."""
    out = tmp_path_factory.mktemp("finished") / "out"
    uptrain(settings(models["model"], out))
    return out


@pytest.fixture(scope="module")
def distilled(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distilled") / "out"
    uptrain(settings(models["model"], out, teacher=str(models["model"]), distill_weight=0.5))
    return out


def copy_run(run: Path, tmp_path: Path, exported: bool = False) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run, out)
    if not exported:  # the final model removed: --resume loads the newest checkpoint to export it
        (out / "model.safetensors").unlink()
    return out


def rewrite_complete(folder: Path) -> None:
    """What an attacker who knows the format does: COMPLETE made to match the files again."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "COMPLETE"):
        data = path.read_bytes()
        crc = zlib.crc32(data[: 1 << 20])
        if len(data) > 2 << 20:
            crc = zlib.crc32(data[-(1 << 20) :], crc)
        elif len(data) > 1 << 20:
            crc = zlib.crc32(data[1 << 20 :], crc)
        files[path.relative_to(folder).as_posix()] = {"size": len(data), "crc32": f"{crc:08x}"}
    (folder / "COMPLETE").write_text(json.dumps({"files": files}))


class RunsCode:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize(
    "name, outcome",
    [
        ("state.json", "skipped"),  # every file this tool reads from a checkpoint
        ("state-rank00000.safetensors", "damaged"),
        ("rng-rank0.safetensors", "damaged"),
        ("trainer_state.json", "skipped"),
        ("COMPLETE", "skipped"),
        (".metadata", "ignored"),  # what torch.distributed.checkpoint or DeepSpeed would read: never opened
        ("__0_0.distcp", "ignored"),
        ("rng-rank0.pt", "ignored"),
        ("optimizer.pt", "ignored"),
    ],
)
def test_a_checkpoint_holding_a_pickle_runs_no_code(models, finished, tmp_path, name, outcome):
    out = copy_run(finished, tmp_path)
    marker = tmp_path / "code-ran"
    folder = out / NEWEST
    (folder / name).write_bytes(pickle.dumps(RunsCode(marker)))
    if name != "COMPLETE":
        rewrite_complete(folder)
    if outcome == "damaged":
        message = fails(["uptrain", models["model"], "-o", out, *ARGS, "--resume"], "damaged", name)
        assert "step-00000004" in message
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = invoke("uptrain", models["model"], "-o", out, *ARGS, "--resume")
        skipped = [str(w.message) for w in caught if "is damaged" in str(w.message)]
        assert bool(skipped) == (outcome == "skipped"), skipped
        assert result.exit_code == 0, result.output
        resumed = "step-00000002" if outcome == "skipped" else "step-00000004"
        assert f"resumed from {resumed}" in result.output
        assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not marker.exists(), "a pickle in the checkpoint ran code"


@pytest.mark.parametrize(
    "file, content, expected",
    [
        ("trainer_state.json", '{"format_version": 2, "step": "4", "tokens": 512, "run": {}}', "lacks its step"),
        ("trainer_state.json", '{"format_version": 2, "step": 2, "tokens": 512, "run": {}}', "not of this folder"),
        ("trainer_state.json", '{"format_version": 2, "step": 4, "tokens": -1, "run": {}}', "lacks its step"),
        ("trainer_state.json", '{"format_version": 2, "step": 4, "tokens": 0, "run": []}', "lacks its step"),
        ("trainer_state.json", "[1, 2]", "is not what this tool writes"),
        ("trainer_state.json", '{"step": 4' + " " * 10, "unreadable"),
        ("COMPLETE", '{"files": {"../../../etc/passwd": {"size": 1, "crc32": "0"}}}', "not a file inside"),
        ("COMPLETE", '{"files": {"/etc/passwd": {"size": 1, "crc32": "0"}}}', "not a file inside"),
        ("COMPLETE", '{"files": {"trainer_state.json": {"size": -5, "crc32": "0"}}}', "no size and checksum"),
        ("COMPLETE", '{"files": []}', "lists no files"),
        ("COMPLETE", "\x00\x01binary", "unreadable"),
        ("state.json", '{"format": "gqa-convert-dcp", "format_version": 1, "tensors": {"x": {"dtype": "F32", '
         '"size": [2], "chunks": [{"offsets": [0], "sizes": [2], "file": "../../x", "key": "0"}]}}}', "not one of"),
        ("state.json", '{"format": "gqa-convert-dcp", "format_version": 1, "tensors": {"x": {"dtype": "PICKLE", '
         '"size": [2], "chunks": []}}}', "no known dtype"),
        ("state.json", '{"format": "gqa-convert-dcp", "format_version": 1, "tensors": {"x": {"dtype": "F32", '
         '"size": [2], "chunks": [{"offsets": [1], "sizes": [2], "file": "state-rank00000.safetensors", '
         '"key": "0"}]}}}', "outside its tensor"),
    ],
)  # fmt: skip
def test_tampered_checkpoint_json_is_skipped_with_a_warning(finished, tmp_path, file, content, expected):
    """Schema-checked reads: a checkpoint whose JSON is not what this tool writes is named and skipped
    for the one before it (resuming from it is tested end to end in test_resume.py)."""
    out = copy_run(finished, tmp_path)
    folder = out / NEWEST
    (folder / file).write_text(content)
    if file != "COMPLETE":
        rewrite_complete(folder)
    with pytest.warns(UserWarning, match=rf"checkpoint step-00000004 is damaged \(.*{expected}"):
        assert newest_intact(out, trust_deepspeed=False).step == 2


def test_tampered_metrics_lines_are_dropped_not_a_traceback(models, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / NEWEST)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    bad = ['{"step": "x", "tokens": 1}', "[1, 2]", '{"step": 3, "tokens": true, "loss": 1}', "\x00\xff garbage"]
    bad += ['{"step": 2, "tokens": 256, "loss": "low"}', "{" + "1" * 200_000]  # a line longer than any record
    (out / "metrics.jsonl").write_text("\n".join(lines[:2] + bad + lines[2:]) + "\n" + '{"step": 9, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 7 unreadable line"):
        result = invoke("uptrain", models["model"], "-o", out, *ARGS, "--resume")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "run, change, before, after",
    [
        ("finished", ["--teacher", "teacher"], "no teacher", "teacher llama"),
        ("distilled", [], "teacher llama", "no teacher"),
        ("distilled", ["--teacher", "teacher"], "teacher llama", "teacher llama"),
        ("distilled", ["--teacher", "model", "--distill-weight", 0.3], "--distill-weight 0.5", "--distill-weight 0.3"),
        (
            "distilled",
            ["--teacher", "model", "--distill-temperature", 2],
            "--distill-temperature 1.0",
            "temperature 2.0",
        ),
        ("finished", ["--trainable", "attention"], "--trainable all", "--trainable attention"),
        ("finished", ["--model", "teacher"], "a model llama", "a model llama"),
        ("finished", ["--data", "technical"], "data of 1331 tokens", "data of"),  # tokenized, then removed
    ],
)
def test_resume_refuses_what_the_contract_says_must_stay(
    models, finished, distilled, tmp_path, run, change, before, after
):
    out = copy_run({"finished": finished, "distilled": distilled}[run], tmp_path, exported=True)
    state = snapshot(out)
    model = models["model"]
    if change[:1] == ["--model"]:
        model, change = models[change[1]], change[2:]
    others = {**models, "technical": Path(__file__).parent / "data" / "technical.txt"}
    change = [others[c] if c in ("teacher", "model", "technical") else c for c in change]
    message = fails(["uptrain", model, "-o", out, *ARGS, *change, "--resume"], "step-00000004 was trained with")
    assert before in message.split("this run has")[0] and after in message.split("this run has")[1], message
    assert snapshot(out) == state


def test_a_finished_run_resumed_says_so_and_changes_nothing(models, finished, tmp_path):
    out = copy_run(finished, tmp_path, exported=True)
    state = snapshot(out)
    result = invoke("uptrain", models["model"], "-o", out, *ARGS, "--resume")
    assert result.exit_code == 0, result.output
    assert "is finished (step 4 of 4) and exported: nothing to do" in result.stderr
    assert json.loads(result.stdout)["steps"] == STEPS and snapshot(out) == state


@pytest.mark.parametrize("damage", ["removed", "only the step-0 record", "garbage"])
def test_a_finished_run_without_its_training_log_reports_an_unknown_loss(models, finished, tmp_path, damage):
    """The summary read back from metrics.jsonl: with no training record left it names that, not a traceback."""
    out = copy_run(finished, tmp_path, exported=True)
    log = out / "metrics.jsonl"
    if damage == "removed":
        log.unlink()
    else:
        log.write_text('{"step": 0, "tokens": 0, "eval_perplexity": 9.5}\n' if damage != "garbage" else "\x00{[\n")
    with pytest.warns(UserWarning, match="holds no training step: the final loss is not known"):
        result = invoke("uptrain", models["model"], "-o", out, *ARGS, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"out": str(out), "steps": STEPS, "tokens": STEPS * 128, "final_loss": None}


@pytest.mark.parametrize(
    "case", ["only a finished model", "an earlier version's checkpoint", "no intact checkpoint", "--force too"]
)
def test_resume_needs_a_run_of_this_version(models, finished, tmp_path, case):
    out = copy_run(finished, tmp_path, exported=True)
    flags = ["--resume"]
    if case == "only a finished model":
        shutil.rmtree(out / "checkpoints")
        (out / "metrics.jsonl").unlink()
        expected = "nothing to resume"
    elif case == "an earlier version's checkpoint":  # DCP's pickles and a trainer state without a version
        for folder in (out / "checkpoints").iterdir():
            for name in ("state.json", "state-rank00000.safetensors"):
                (folder / name).unlink()
            (folder / "__0_0.distcp").write_bytes(b"\x80\x04old")
            (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "code-ran")))
            state = json.loads((folder / "trainer_state.json").read_text())
            del state["format_version"]
            (folder / "trainer_state.json").write_text(json.dumps(state))
            rewrite_complete(folder)
        expected = "written by an earlier gqa-convert"
    elif case == "no intact checkpoint":  # never start over on its own: the damaged ones would be pruned
        for folder in (out / "checkpoints").iterdir():
            (folder / "trainer_state.json").write_text("{}")
        expected = "no intact checkpoint in"
    else:
        flags.append("--force")
        expected = "pass one of them"
    before = snapshot(out)
    fails(["uptrain", models["model"], "-o", out, *ARGS, *flags], expected)
    assert snapshot(out) == before and not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("distributed_type: MULTI_GPU\nnum_processes: two\n", "num_processes must be an integer, not 'two'"),
        ("distributed_type: FSDP\nfsdp_config: [1, 2]\n", "fsdp_config must be a mapping"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config: zero3\n", "deepspeed_config must be a mapping"),
        ("distributed_type: TPU_POD\n", "distributed_type TPU_POD is not supported"),
        ("distributed_type: NO\n", 'a string such as "NO" (in quotes'),
        ("distributed_type: MULTI_GPU\nnum_processes: -2\n", "num_processes -2 is out of range"),
        ("distributed_type: MULTI_GPU\nnum_processes: true\n", "num_processes must be an integer"),
        ("distributed_type: MULTI_GPU\nmain_process_port: 70000\n", "main_process_port 70000 is out of range"),
        ("distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 2\n", "machine_rank 2 must be below"),
        ("distributed_type: MULTI_GPU\nuse_cpu: maybe\n", "use_cpu must be true or false"),
        ("distributed_type: MULTI_GPU\nmixed_precision: fp32\n", "mixed_precision must be no, fp16, bf16"),
        ("distributed_type: MULTI_GPU\nnum_gpus: 8\n", "unknown keys num_gpus"),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 3\n", "fsdp_version must be 1 or 2"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: three\n", "zero_stage must be 0, 1, 2 or 3"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: /nonexistent.json\n", "not found"),
        ("- a\n- list\n", "holds a list, not an Accelerate YAML"),
        ("", "is empty"),
        ("distributed_type: [unclosed\n", "is not valid YAML"),
        ("distributed_type: MULTI_GPU\nnum_processes: 1e3\n", "num_processes must be an integer"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not a text file"),
        (b"key: \x00value\n", "is a binary file"),
        ("folder", "is a folder"),
        ("huge", "too large"),
    ],
)
def test_an_accelerate_yaml_of_the_wrong_shape_is_one_line(models, tmp_path, text, expected):
    path = tmp_path / "accelerate.yaml"
    if text == "folder":
        path.mkdir()
    elif text == "huge":
        path.write_text("# padding\n" * 200_000)
    elif isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    out = tmp_path / "out"
    fails(["uptrain", models["model"], "-o", out, *ARGS, "--accelerate-config", path], expected)
    assert not out.exists()


@pytest.mark.parametrize("case", ["tokenizer outgrew the model", "teacher vocabulary", "manifest max id", "shard ids"])
def test_ids_outside_the_vocabulary_are_refused_before_a_forward(models, tmp_path, case):
    from gqa_convert.data.tokenize import TokenizeOptions, tokenize

    tokens = tmp_path / "tokens"
    tokenize(str(SAMPLE), tokens, TokenizeOptions(tokenizer=str(models["model"]), progress=False))
    model, extra, expected = models["model"], ["--data", tokens], ""
    if case == "tokenizer outgrew the model":
        model, extra, expected = models["grown"], [], "gives ids up to 359, but its config.vocab_size is 320"
    elif case == "teacher vocabulary":
        extra, expected = ["--teacher", models["wide"]], "the teacher's vocabulary (400) differs from the model's (320)"
    elif case == "manifest max id":
        manifest = json.loads((tokens / "manifest.json").read_text())
        (tokens / "manifest.json").write_text(json.dumps({**manifest, "max_token_id": 320}))
        expected = "holds token id 320, but"
    else:  # a shard rewritten in place: same size, ids past the embedding
        shard = next(tokens.glob("shard-*"))
        np.full(shard.stat().st_size // 2, 0xFFFF, dtype=np.uint16).tofile(shard)
        expected = "holds token id 65535"
    out = tmp_path / "out"
    before = snapshot(tokens)
    fails(["uptrain", model, "-o", out, *ARGS, *extra], expected)
    assert snapshot(tokens) == before
    if case == "shard ids":  # found in a batch, after the run began: no step was trained
        assert not any((out / "checkpoints").iterdir()) and not (out / "metrics.jsonl").exists()
    else:
        assert not out.exists()


@pytest.mark.parametrize(
    "target, code, expected",
    [
        ("gqa_convert.train.metrics.MetricsLog.write", errno.ENOSPC, "metrics.jsonl was not written (No space left"),
        ("gqa_convert.train.strategies.ddp.DataParallel.save_state", errno.EROFS, "checkpoint step-00000002 was not"),
        ("gqa_convert.train.checkpoint.save_rng_state", errno.EACCES, "make OUT writable"),
        ("gqa_convert.io.writer.ShardedWriter.write", errno.EDQUOT, "the final model was not written"),
    ],
)
def test_a_refused_write_is_one_line_and_leaves_nothing_partial(models, tmp_path, monkeypatch, target, code, expected):
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), "OUT/some-file")

    monkeypatch.setattr(target, refuse)
    out = tmp_path / "out"
    message = fails(["uptrain", models["model"], "-o", out, *ARGS], expected)
    assert "OUT/some-file" in message and "rerun with --resume" in message
    checkpoints = list((out / "checkpoints").iterdir())
    assert all((folder / "COMPLETE").is_file() for folder in checkpoints), "a partial checkpoint is left"
    assert not (out / ".export-tmp").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("which", ["teacher", "eval_data", "accelerate_config", "data"])
def test_an_input_inside_out_is_refused_whatever_the_flags(models, finished, tmp_path, which):
    out = copy_run(finished, tmp_path, exported=True)
    inside = out / "inputs" / which
    if which == "teacher":
        shutil.copytree(models["model"], inside)
    else:
        inside.parent.mkdir()
        shutil.copy(SAMPLE, inside)
        if which == "accelerate_config":
            inside.write_text('distributed_type: "NO"\n')
    before = snapshot(out)
    flag = "--" + which.replace("_", "-")
    for flags in (["--resume"], ["--force"]):
        fails(["uptrain", models["model"], "-o", out, *ARGS, flag, inside, *flags], "inside")
    assert snapshot(out) == before


def test_a_second_run_into_the_same_out_is_refused(models, finished, tmp_path):
    """Two runs at once into one OUT would write the same checkpoints: the second is refused."""
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    with output_lock(out):  # the first run holds OUT
        fails(["uptrain", models["model"], "-o", out, *ARGS, "--resume"], "being written by another gqa-convert run")
    assert snapshot(out) == before


def test_another_machine_resumes_rank_0s_choice_and_clears_nothing(models, finished, tmp_path):
    """A machine of rank > 0 checks the run it joins (the same contract) and never deletes anything."""
    from gqa_convert.train.plan import prepare

    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    machines = dict(num_processes=2, num_machines=2, main_process_ip="127.0.0.1", resume=True, micro_batch_size=2)
    plan = prepare(settings(models["model"], out, machine_rank=1, **machines))
    assert plan.resume_step == STEPS and snapshot(out) == before
    with pytest.raises(Exception, match="this run has --seed 1"):
        prepare(settings(models["model"], out, machine_rank=1, seed=1, **machines))


@pytest.mark.parametrize("entry", ["cut short", "a link elsewhere", "a file"])
def test_a_checkpoint_entry_that_is_not_a_whole_folder_is_never_read(models, finished, tmp_path, entry):
    """Killed mid-save (no COMPLETE), a link to a folder outside OUT, a stray file: not read (a pickle
    there runs no code), not followed, and replaced by the step's new checkpoint; the run ends as the
    uninterrupted one did."""
    out = copy_run(finished, tmp_path)
    step = out / NEWEST
    elsewhere = tmp_path / "elsewhere"
    if entry == "cut short":
        (step / "COMPLETE").unlink()
        (step / "state-rank00000.safetensors").write_bytes(pickle.dumps(RunsCode(tmp_path / "code-ran")))
    elif entry == "a link elsewhere":
        shutil.move(step, elsewhere)
        step.symlink_to(elsewhere)
    else:
        shutil.rmtree(step)
        step.write_bytes(pickle.dumps(RunsCode(tmp_path / "code-ran")))
    kept = snapshot(elsewhere) if elsewhere.exists() else None
    result = invoke("uptrain", models["model"], "-o", out, *ARGS, "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed from step-00000002" in result.output and not (tmp_path / "code-ran").exists()
    assert (step / "COMPLETE").is_file() and not step.is_symlink()
    if kept is not None:
        assert snapshot(elsewhere) == kept
    final = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in transformers.AutoModelForCausalLM.from_pretrained(finished).state_dict().items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5)


def test_a_damaged_token_folder_of_the_run_is_tokenized_again(models, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / NEWEST)
    (folder,) = (out / "data").iterdir()
    (folder / "manifest.json").write_text((folder / "manifest.json").read_text()[:50])
    with pytest.warns(UserWarning, match=rf"{folder.name} is damaged: .* is tokenized again"):
        result = invoke("uptrain", models["model"], "-o", out, *ARGS, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "manifest.json").read_text())["tokens"] > 0
    assert [r["loss"] for r in read_records(out / "metrics.jsonl")] == [
        r["loss"] for r in read_records(finished / "metrics.jsonl")
    ]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--num-processes", 0], "--num-processes must be at least 1"),
        (["--num-processes", 0, "--dry-run"], "--num-processes must be at least 1"),
        (
            ["--micro-batch-size", 10**9, "--tokens", "100T"],
            "fewer than one micro-batch (--micro-batch-size 1000000000)",
        ),
        (["--grad-accum", 10**9], "smaller than one optimizer step"),
        (["--global-batch-tokens", 1000], "not a multiple of micro batch x processes x seq len = 128"),
    ],
)
def test_impossible_sizes_are_refused_before_anything_is_written(models, tmp_path, extra, expected):
    out = tmp_path / "out"
    fails(["uptrain", models["model"], "-o", out, *ARGS, *extra], expected)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_the_contract_covers_every_option_once_and_the_docs_show_it():
    """A key-set contract: each option of uptrain is in exactly one row; docs/uptrain.md holds the
    table the code enforces."""
    import dataclasses

    from gqa_convert.train.checkpoint.contract import CONTRACT, contract_markdown

    covered = [name for term in CONTRACT for name in term.options]
    assert sorted(covered) == sorted(field.name for field in dataclasses.fields(TrainSettings))
    docs = (Path(__file__).resolve().parents[1] / "docs" / "uptrain.md").read_text()
    assert contract_markdown() in docs
