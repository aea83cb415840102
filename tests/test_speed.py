"""What uptrain does for speed keeps its numbers: --compile (each decoder block through torch.compile)
gives the eager run's loss curve up to float rounding, and auto leaves CPU runs eager; records read
back one step late (as on GPUs) are the records read at once, every step of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gqa_convert.train.launch import uptrain
from gqa_convert.train.settings import TrainSettings

from tiny_models import build_trainable

SAMPLE = Path(__file__).parent / "data" / "sample.txt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("speed") / "model"
    build_trainable(folder, "llama")
    return folder


def run(model: Path, out: Path, **settings: object) -> list[dict]:
    """The metrics records of a 20-step run."""
    options = dict(tokens=20 * 4 * 32, seq_len=32, micro_batch_size=4, lr=3e-3, save_every=1000)
    uptrain(TrainSettings(model=str(model), out=str(out), data=str(SAMPLE), **{**options, **settings}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(model: Path, out: Path, compile: str) -> tuple[list[float], int]:
    """The loss of each of 20 steps, and the graphs torch.compile made during the run."""
    from torch._dynamo.utils import counters

    counters.clear()
    rows = run(model, out, compile=compile)
    return [row["loss"] for row in rows], counters["stats"]["unique_graphs"]


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU (inductor) needs a C++ compiler, and none is on PATH",
)
def test_compiled_blocks_train_like_eager_ones(model_dir, tmp_path):
    eager, eager_graphs = losses(model_dir, tmp_path / "eager", "auto")  # auto: eager on CPU
    compiled, compiled_graphs = losses(model_dir, tmp_path / "compiled", "on")
    assert eager_graphs == 0
    assert compiled_graphs >= 1  # the blocks did run compiled
    assert len(eager) == len(compiled) == 20
    assert eager[-1] < eager[0] - 0.5  # a curve that moves: equal curves are not equal constants
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    torch._dynamo.reset()


def test_records_read_one_step_late_are_every_step_as_read_at_once(model_dir, tmp_path, monkeypatch):
    from gqa_convert.train.loop import Trainer

    at_once = run(model_dir, tmp_path / "at-once", save_every=7)
    settle, lags = Trainer.settle, []

    def spied(self, record):
        lags.append(self.step - record["step"])  # steps trained since the one being read
        return settle(self, record)

    monkeypatch.setattr(Trainer, "settle", spied)
    monkeypatch.setattr(Trainer, "defers_reading", lambda self: True)  # as on GPUs
    late = run(model_dir, tmp_path / "late", save_every=7)  # checkpoints at 7, 14 and 20: read at once
    assert lags.count(1) == 17 and lags.count(0) == 3, lags
    assert [row["step"] for row in late] == list(range(1, 21))
    measured = ("step", "tokens", "loss", "lr", "grad_norm")
    assert [[row[key] for key in measured] for row in late] == [[row[key] for key in measured] for row in at_once]
    assert all(row["tokens_per_s"] > 0 for row in late)
    assert list(late[0]) == list(at_once[0]) == ["step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm"]
