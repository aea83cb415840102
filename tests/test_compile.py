"""--compile: each decoder block through torch.compile gives the eager run's loss curve (up to float
rounding), and auto leaves CPU runs eager."""

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

pytestmark = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU (inductor) needs a C++ compiler, and none is on PATH",
)


def losses(model: Path, out: Path, compile: str) -> tuple[list[float], int]:
    """The loss of each of 20 steps, and the graphs torch.compile made during the run."""
    from torch._dynamo.utils import counters

    counters.clear()
    uptrain(
        TrainSettings(
            model=str(model),
            out=str(out),
            data=str(SAMPLE),
            tokens=20 * 4 * 32,
            seq_len=32,
            micro_batch_size=4,
            lr=3e-3,
            save_every=1000,
            compile=compile,
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows], counters["stats"]["unique_graphs"]


def test_compiled_blocks_train_like_eager_ones(tmp_path):
    model = tmp_path / "model"
    build_trainable(model, "llama")
    eager, eager_graphs = losses(model, tmp_path / "eager", "auto")  # auto: eager on CPU
    compiled, compiled_graphs = losses(model, tmp_path / "compiled", "on")
    assert eager_graphs == 0
    assert compiled_graphs >= 1  # the blocks did run compiled
    assert len(eager) == len(compiled) == 20
    assert eager[-1] < eager[0] - 0.5  # a curve that moves: equal curves are not equal constants
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    torch._dynamo.reset()
