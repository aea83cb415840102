"""Uptraining on CPU with a tiny model and a tokenizer trained here: learning, exact token budgets,
two processes over gloo equal to one, SIGKILL and resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gqa_convert.train.launch import uptrain
from gqa_convert.train.settings import TrainSettings

from tiny_models import build_trainable

SAMPLE = Path(__file__).parent / "data" / "sample.txt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uptrain") / "model"
    build_trainable(folder, "llama")  # 4 query heads, 2 kv heads
    return folder


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "gqa_convert.cli", "uptrain", *map(str, args)]


COMMON = ["--data", SAMPLE, "--seq-len", 32, "--lr", 3e-3, "--tokens", 25600]


def test_loss_falls_and_tokens_land_on_the_budget(model_dir, tmp_path):
    out = tmp_path / "out"
    result = uptrain(
        TrainSettings(
            model=str(model_dir),
            out=str(out),
            data=str(SAMPLE),
            tokens="25600",
            seq_len=32,
            micro_batch_size=4,
            lr=3e-3,
            save_every=1000,
        )
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 201))  # 25600 / (4 x 32)
    assert rows[-1]["tokens"] == 25600 == result["tokens"]
    assert all(b["tokens"] - a["tokens"] == 128 for a, b in zip(rows, rows[1:]))
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (rows[:20], rows[-20:]))
    assert last < 0.5 * first, (first, last)
    assert {"lr", "tokens_per_s"} <= set(rows[0])
    # the result is a plain transformers folder with the kv head count unchanged
    trained = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    assert trained.config.num_key_value_heads == 2
    assert not torch.equal(
        trained.model.layers[0].self_attn.k_proj.weight, original.model.layers[0].self_attn.k_proj.weight
    )
    assert AutoTokenizer.from_pretrained(out)("market")["input_ids"]
    provenance = json.loads((out / "gqa_convert.json").read_text())
    assert provenance["uptrain"]["tokens"] == 25600 and provenance["uptrain"]["steps"] == 200
    assert provenance["uptrain"]["final_loss"] == rows[-1]["loss"]


def test_budget_rounds_up_to_whole_steps_and_attention_only_freezes_the_rest(model_dir, tmp_path):
    out = tmp_path / "out"
    uptrain(
        TrainSettings(
            model=str(model_dir),
            out=str(out),
            data=str(SAMPLE),
            tokens="1000",
            seq_len=32,
            micro_batch_size=2,
            grad_accum=2,
            trainable="attention",
            lr=1e-2,
        )
    )
    rows = metrics(out)
    assert len(rows) == 8 and rows[-1]["tokens"] == 8 * 128  # ceil(1000 / 128) steps
    trained, original = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(model_dir)
    layer, before = trained.model.layers[0], original.model.layers[0]
    assert torch.equal(layer.mlp.up_proj.weight, before.mlp.up_proj.weight)
    assert torch.equal(trained.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert not torch.equal(layer.self_attn.v_proj.weight, before.self_attn.v_proj.weight)


def test_two_processes_train_the_same_global_batches_as_one(model_dir, tmp_path):
    """Same global batch (2 processes x 2 blocks = 1 x 4): the same blocks per step, the same losses."""
    single, double = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "CI": "1"}
    subprocess.run(
        cli(model_dir, "-o", single, *COMMON, "--micro-batch-size", 4),
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    process = subprocess.run(
        cli(model_dir, "-o", double, *COMMON, "--micro-batch-size", 2, "--num-processes", 2),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    one, two = metrics(single), metrics(double)
    assert len(two) == len(one) == 200 and two[-1]["tokens"] == one[-1]["tokens"] == 25600
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3), (a, b)
    assert AutoModelForCausalLM.from_pretrained(double).config.num_key_value_heads == 2


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = 120  # killed after step 45, past the checkpoint at 40, and resumed from there
    model = tmp_path / "model"
    build_trainable(model, "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    args = [
        "--data",
        SAMPLE,
        "--seq-len",
        128,
        "--micro-batch-size",
        4,
        "--lr",
        1e-3,
        "--tokens",
        steps * 512,
        "--save-every",
        20,
    ]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(cli(model, "-o", reference, *args), check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(cli(model, "-o", killed, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and len(metrics(killed)) >= 45:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(metrics(killed))
    assert 40 <= done < steps, "the run must be killed between its checkpoint and its end"
    assert (killed / "checkpoints" / "step-00000040" / "COMPLETE").exists()

    resumed = subprocess.run(cli(model, "-o", killed, *args, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-000000" in resumed.stdout + resumed.stderr
    rows, expected = metrics(killed), metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # none missing, none twice
    assert rows[-1]["tokens"] == expected[-1]["tokens"] == steps * 512
    for a, b in zip(expected, rows):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), (a, b)
    final = AutoModelForCausalLM.from_pretrained(killed).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(reference).state_dict().items():
        torch.testing.assert_close(final[name], tensor, atol=1e-4, rtol=1e-3)


def test_distillation_from_the_source_teacher(model_dir, tmp_path):
    """KL to itself is zero; a mean-pooled MQA student moves towards its GQA teacher."""
    same = tmp_path / "same"
    uptrain(
        TrainSettings(
            model=str(model_dir),
            out=str(same),
            data=str(SAMPLE),
            tokens="256",
            seq_len=32,
            micro_batch_size=4,
            teacher=str(model_dir),
            distill_weight=1.0,
            lr=1e-9,
        )
    )
    assert metrics(same)[0]["distill_loss"] == pytest.approx(0.0, abs=1e-6)

    from gqa_convert.surgery.convert import pool
    from gqa_convert.surgery.options import PoolOptions

    from tiny_models import save_tiny_tokenizer

    teacher = tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # a teacher whose kv heads differ a lot, so pooling costs something
        for parameter in model.model.layers.parameters():
            parameter.normal_(0, 0.2)
    model.save_pretrained(teacher)
    save_tiny_tokenizer(teacher)
    pool(teacher, tmp_path / "mqa", PoolOptions(recipe="mean", kv_heads=1))
    out = tmp_path / "distilled"
    uptrain(
        TrainSettings(
            model=str(tmp_path / "mqa"),
            out=str(out),
            data=str(SAMPLE),
            tokens=str(60 * 128),
            seq_len=32,
            micro_batch_size=4,
            teacher=str(teacher),
            distill_weight=1.0,
            lr=3e-3,
        )
    )
    rows = metrics(out)
    first, last = (sum(r["distill_loss"] for r in part) / 10 for part in (rows[:10], rows[-10:]))
    assert rows[0]["distill_loss"] > 1e-3 and last < 0.5 * first, (first, last)


def test_a_token_folder_trains_like_the_raw_file_and_another_tokenizer_is_refused(model_dir, tmp_path):
    """--data TOKENS: nothing re-tokenized, the same blocks (hence losses) as the raw file, the budget
    met; a folder made with another tokenizer is refused before anything is written."""
    from gqa_convert.data.tokenize import TokenizeOptions, tokenize
    from gqa_convert.errors import GQAConvertError

    from tiny_models import save_tiny_tokenizer

    tokens = tmp_path / "tokens"
    tokenize(str(SAMPLE), tokens, TokenizeOptions(tokenizer=str(model_dir), progress=False))
    common = dict(model=str(model_dir), tokens="2560", seq_len=32, micro_batch_size=4, lr=3e-3)
    raw, folder = tmp_path / "raw", tmp_path / "folder"
    uptrain(TrainSettings(out=str(raw), data=str(SAMPLE), **common))
    result = uptrain(TrainSettings(out=str(folder), data=str(tokens), **common))
    assert result["tokens"] == 2560 and len(metrics(folder)) == 20
    assert [r["loss"] for r in metrics(folder)] == [r["loss"] for r in metrics(raw)]
    assert not (folder / "data").exists() and (raw / "data").is_dir()
    plan = uptrain(TrainSettings(out=str(tmp_path / "dry"), data=str(tokens), dry_run=True, **common))
    assert plan["steps"] == 20 and (tokens / "manifest.json").is_file()  # a dry run leaves the data alone

    other = tmp_path / "other-tokenizer"
    save_tiny_tokenizer(other, vocab_size=300)
    tokenize(str(SAMPLE), tmp_path / "other-tokens", TokenizeOptions(tokenizer=str(other), progress=False))
    with pytest.raises(
        GQAConvertError,
        match=r"other-tokens was tokenized with .*other-tokenizer \(tokenizer [0-9a-f]{12}\) but .*model uses .*model \([0-9a-f]{12}\): tokenize the data again",
    ):
        uptrain(TrainSettings(out=str(tmp_path / "refused"), data=str(tmp_path / "other-tokens"), **common))
    assert not (tmp_path / "refused").exists()


def test_only_machine_rank_0_tokenizes_and_replaces_out(model_dir, tmp_path):
    """Raw data on two machines: rank 1 waits for rank 0's manifest (or gives up with a clear
    message), never deletes anything even with --force; rank 0 tokenizes once into OUT/data."""
    import threading

    from gqa_convert.errors import GQAConvertError
    from gqa_convert.train.plan import prepare

    def settings(rank: int, out: Path, **extra) -> TrainSettings:
        return TrainSettings(
            model=str(model_dir), out=str(out), data=str(SAMPLE), tokens="2560", seq_len=32, num_processes=2,
            num_machines=2, machine_rank=rank, main_process_ip="127.0.0.1", **extra,
        )  # fmt: skip

    alone = tmp_path / "alone"
    with pytest.raises(GQAConvertError, match=r"machine rank 1 waited 0.02 minutes for machine rank 0 to tokenize"):
        prepare(settings(1, alone, timeout_minutes=0.02))
    assert not alone.exists()

    out, plans = tmp_path / "out", {}
    waiting = threading.Thread(target=lambda: plans.update(one=prepare(settings(1, out))))
    waiting.start()
    time.sleep(1.0)
    plans["zero"] = prepare(settings(0, out))
    waiting.join(timeout=120)
    assert plans["one"].train_tokens == plans["zero"].train_tokens
    folder = Path(plans["zero"].train_tokens)
    assert folder.parent == out.resolve() / "data" and (folder / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside OUT
    shard = folder / "shard-000000.tokens"
    inode = shard.stat().st_ino

    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    prepare(settings(1, out, force=True))
    assert (out / "checkpoints" / "step-00000001").exists(), "--force on a machine other than rank 0 deletes nothing"
    prepare(settings(0, out, force=True))
    assert not (out / "checkpoints" / "step-00000001").exists(), "rank 0 replaces OUT"
    assert shard.stat().st_ino == inode, "the token folder this run uses is kept, not tokenized again"


def test_machines_wait_for_each_other_up_to_the_timeout():
    """--timeout-minutes reaches the rendezvous of several machines (torch's default is 600 s)."""
    from gqa_convert.train.launch import launch_command
    from gqa_convert.train.plan import TrainPlan

    settings = TrainSettings(
        model="m", out="o", data="d", num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", timeout_minutes=90
    )
    plan = TrainPlan(settings, "ddp", "no", world_size=16, grad_accum=1, steps=1, budget_origin="", vocab_size=2,
                     train_tokens="t")  # fmt: skip
    command = launch_command(plan)
    assert command is not None and command[command.index("--rdzv_conf") + 1] == "join_timeout=5400"
    assert command[command.index("--machine_rank") + 1] == "1"
