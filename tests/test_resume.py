"""Nothing lost, nothing leaked: --resume refuses settings that change the data order or the budget (one
line); a damaged latest checkpoint is skipped for the one before it and a torn metrics line is tolerated,
with the same result as the uninterrupted run; a full disk during a checkpoint or the export is one line,
and --resume then trains on, or only exports."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from gqa_convert.cli import app
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.writer import ShardedWriter
from gqa_convert.train.launch import uptrain
from gqa_convert.train.settings import TrainSettings

from helpers import checkpoint_tensors, fails
from tiny_models import build_trainable

SAMPLE = Path(__file__).parent / "data" / "sample.txt"
runner = CliRunner()
ARGS = ["--data", SAMPLE, "--seq-len", 32, "--micro-batch-size", 4, "--lr", 3e-3, "--tokens", 8 * 128]
ARGS += ["--save-every", 2, "--keep-checkpoints", 3]


def settings(model: Path, out: Path, **extra: object) -> TrainSettings:
    return TrainSettings(
        model=str(model), out=str(out), data=str(SAMPLE), seq_len=32, micro_batch_size=4, lr=3e-3,
        tokens=str(8 * 128), save_every=2, keep_checkpoints=3, **extra,
    )  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "model"
    build_trainable(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory) -> Path:
    """8 steps, checkpoints of steps 4, 6 and 8 kept (8: the final checkpoint, saved before the export)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    uptrain(settings(model_dir, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-0000000{s}" for s in (4, 6, 8)]
    return out


@pytest.mark.parametrize(
    "change, before, after",
    [
        (["--seq-len", 64], "--seq-len 32", "--seq-len 64"),
        (["--micro-batch-size", 2], "a global batch of 4 sequences", "a global batch of 2 sequences"),
        (["--tokens", 16 * 128], "8 steps", "16 steps"),
        (["--seed", 1], "--seed 0", "--seed 1"),
    ],
)
def test_changed_settings_are_refused(model_dir, finished, tmp_path, change, before, after):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    message = fails(["uptrain", model_dir, "-o", out, *ARGS, *change, "--resume"], "step-00000008", before, after)
    assert message.index(before) < message.index("this run has") < message.index(after)
    assert len(metrics(out)) == 8


def test_changed_data_is_refused(model_dir, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    other = Path(__file__).parent / "data" / "technical.txt"
    message = fails(["uptrain", model_dir, "-o", out, *ARGS, "--data", other, "--resume"], "step-00000008")
    before, after = message.split("this run has")
    assert re.search(r"data of \d+ tokens \(shards \w{12}\)", before) and "data of" in after, message
    assert before[before.index("data of") :].split(")")[0] != after[after.index("data of") :].split(")")[0]
    assert len(metrics(out)) == 8


def test_settings_that_may_change_resume_and_a_finished_run_only_exports(model_dir, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "model.safetensors").unlink()
    before = (out / "metrics.jsonl").read_text()
    result = runner.invoke(
        app, [str(a) for a in ["uptrain", model_dir, "-o", out, *ARGS, "--resume", "--save-every", 3]]
    )
    assert result.exit_code == 0, result.output
    assert "resumed from step-00000008" in result.output
    assert (out / "metrics.jsonl").read_text() == before  # no step trained again
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(finished).state_dict().items():
        assert torch.equal(exported[name], tensor), name


def test_a_ddp_checkpoint_resumes_under_fsdp2(model_dir, finished, tmp_path):
    """The same checkpoint format: full tensors are resharded into FSDP2's shards."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints" / "step-00000008")
    result = runner.invoke(
        app, [str(a) for a in ["uptrain", model_dir, "-o", out, *ARGS, "--resume", "--strategy", "fsdp2"]]
    )
    assert result.exit_code == 0, result.output
    assert "resumed from step-00000006" in result.output and "fsdp2 rank 0/1 holds" in result.output
    for a, b in zip(metrics(finished), metrics(out)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(finished).state_dict().items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-4)


def test_damaged_checkpoints_are_skipped_and_a_torn_metrics_line_tolerated(model_dir, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    shard = out / "checkpoints" / "step-00000008" / "state-rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with open(out / "checkpoints" / "step-00000006" / "state-rank00000.safetensors", "r+b") as handle:
        handle.truncate(1000)
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "lo')  # a line cut short by a crash
    with pytest.warns(UserWarning) as caught:
        result = runner.invoke(app, [str(a) for a in ["uptrain", model_dir, "-o", out, *ARGS, "--resume"]])
    assert result.exit_code == 0, result.output
    warned = " | ".join(str(warning.message) for warning in caught)
    assert "checkpoint step-00000008 is damaged (state-rank00000.safetensors does not hold the bytes" in warned
    assert "checkpoint step-00000006 is damaged (state-rank00000.safetensors has 1,000 bytes" in warned
    assert "metrics.jsonl: dropped 1 unreadable line" in warned
    assert "resumed from step-00000004" in result.output
    rows, expected = metrics(out), metrics(finished)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for a, b in zip(expected, rows):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), (a, b)
    final = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(finished).state_dict().items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5)


def test_full_disk_during_a_checkpoint_is_one_line_then_resume_trains(model_dir, tmp_path):
    """A real write error: a file size limit below one checkpoint shard (EFBIG, like a full disk)."""
    out = tmp_path / "out"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))

    command = [sys.executable, "-m", "gqa_convert.cli", "uptrain", str(model_dir), "-o", str(out), *map(str, ARGS)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, preexec_fn=small_files)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint step-00000002 was not written"), result.stderr
    assert "no checkpoint is kept: " in lines[0] and lines[0].endswith(" and rerun with --resume")
    assert list((out / "checkpoints").iterdir()) == []  # the partial checkpoint is gone
    uptrain(settings(model_dir, out, resume=True))
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))


def test_failed_export_keeps_the_final_checkpoint_and_resume_exports(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def disk_full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ShardedWriter, "write", disk_full)
    with pytest.raises(GQAConvertError) as raised:
        uptrain(settings(model_dir, out))
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and message.startswith("the final model was not written (No space left")
    assert "the checkpoint of step 8 is kept: free space and rerun with --resume to export it" in message
    assert not (out / "model.safetensors").exists() and not (out / ".export-tmp").exists()
    monkeypatch.undo()
    trained = (out / "metrics.jsonl").read_text()
    uptrain(settings(model_dir, out, resume=True))
    assert (out / "metrics.jsonl").read_text() == trained  # exported without training
    expected = checkpoint_tensors(out / "checkpoints" / "step-00000008")
    for name, tensor in AutoModelForCausalLM.from_pretrained(out).state_dict().items():
        assert torch.equal(tensor, expected[name]), name
