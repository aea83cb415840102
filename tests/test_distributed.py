"""Sharded uptraining for real, on two CPU processes over gloo: FSDP2 holds half of the parameters,
optimizer state and teacher on each rank and tracks DDP step by step; its export is the trained model;
a run killed with SIGKILL resumes to the same losses, on two processes and on one (the checkpoint is
resharded); separate OUT folders on two machines are refused in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import checkpoint_tensors
from tiny_models import build_trainable, save_tiny_tokenizer

SAMPLE = Path(__file__).parent / "data" / "sample.txt"
HELDOUT = Path(__file__).parent / "data" / "heldout.txt"
STEPS, SAVE_EVERY = 24, 4
ENV = {**os.environ, "CI": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(model: Path, out: Path, teacher: Path, *extra: object) -> list[str]:
    common = ["--data", SAMPLE, "--seq-len", 32, "--lr", 3e-3, "--tokens", STEPS * 4 * 32, "--save-every", SAVE_EVERY]
    common += ["--teacher", teacher, "--distill-temperature", 2.0]
    return [
        sys.executable,
        "-m",
        "gqa_convert.cli",
        "uptrain",
        str(model),
        "-o",
        str(out),
        *map(str, common + list(extra)),
    ]


def run(command: list[str]) -> str:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def losses(out: Path) -> dict[int, float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if r["step"] > 0}  # step 0: the evaluation before training


def worst_gap(a: dict[int, float], b: dict[int, float], first: int = 1) -> float:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    return max(abs(a[s] - b[s]) / b[s] for s in a if s >= first)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A GQA student (4 heads, 2 kv heads) and an MHA teacher with weights of its own."""
    root = tmp_path_factory.mktemp("distributed")
    build_trainable(root / "student", "llama")
    torch.manual_seed(1)
    teacher = build_trainable(root / "teacher", "llama", num_key_value_heads=4)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.normal_(0, 0.05)
    teacher.save_pretrained(root / "teacher")
    save_tiny_tokenizer(root / "teacher")
    return root / "student", root / "teacher"


@pytest.fixture(scope="module")
def fsdp2_run(models, tmp_path_factory) -> tuple[Path, str]:
    """2 processes x micro-batch 1 x accumulation 2 (gradients reduce-scattered into shards each micro-step), with
    held-out perplexity half-way and at the end (the sharded root's forward)."""
    out = tmp_path_factory.mktemp("fsdp2") / "out"
    extra = ["--strategy", "fsdp2", "--num-processes", 2, "--micro-batch-size", 1, "--grad-accum", 2]
    extra += ["--eval-data", HELDOUT, "--eval-every", STEPS // 2, "--eval-tokens", 1000]
    return out, run(cli(*models[:1], out, models[1], *extra))


@pytest.fixture(scope="module")
def ddp_run(models, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp") / "out"
    return out, run(cli(models[0], out, models[1], "--num-processes", 2, "--micro-batch-size", 2))


def shares(output: str, strategy: str) -> dict[int, dict[str, tuple[int, int]]]:
    """rank -> {"parameters": (held, total), ...} from the line each run prints."""
    found = {}
    for rank, held in re.findall(rf"^{strategy} rank (\d+)/2 holds (.*)$", output, re.M):
        parts = re.findall(r"([a-z ]+) ([\d,]+)/([\d,]+)", held)
        found[int(rank)] = {name.strip(): (int(a.replace(",", "")), int(b.replace(",", ""))) for name, a, b in parts}
    return found


def test_fsdp2_shards_and_tracks_ddp(fsdp2_run, ddp_run):
    (fsdp2_out, fsdp2_output), (ddp_out, ddp_output) = fsdp2_run, ddp_run
    sharded, whole = shares(fsdp2_output, "fsdp2"), shares(ddp_output, "ddp")
    assert set(sharded) == set(whole) == {0, 1}
    for name in ("parameters", "optimizer state", "teacher"):
        held = [sharded[rank][name][0] for rank in (0, 1)]
        total = sharded[0][name][1]
        assert sum(held) == total and all(0.4 * total < h < 0.6 * total for h in held), (name, held, total)
        assert all(whole[rank][name] == (total, total) for rank in (0, 1)), name
    files = {p.name: p.stat().st_size for p in (fsdp2_out / "checkpoints" / "step-00000024").iterdir()}
    shard_bytes = [files["state-rank00000.safetensors"], files["state-rank00001.safetensors"]]
    assert min(shard_bytes) > 0.4 * sum(shard_bytes), shard_bytes  # each rank wrote its half
    gap = worst_gap(losses(fsdp2_out), losses(ddp_out))
    print(f"FSDP2 vs DDP: max relative loss gap {gap:.3e} over {STEPS} steps")
    assert gap <= 2e-3
    rows = [json.loads(line) for line in (fsdp2_out / "metrics.jsonl").read_text().splitlines()]
    distill = [row["distill_loss"] for row in rows if row["step"] > 0]
    assert min(distill) > 1e-3  # a teacher that differs from the student: a real signal


def models_of(out: Path) -> tuple[str, str]:
    """The student and teacher a run trained, from its provenance."""
    arguments = json.loads((out / "gqa_convert.json").read_text())["uptrain"]["arguments"]
    return arguments["model"], arguments["teacher"]


def test_fsdp2_export_is_the_trained_model(fsdp2_run, ddp_run, tmp_path):
    out = fsdp2_run[0]
    trained = checkpoint_tensors(out / "checkpoints" / "step-00000024")  # assembled from both ranks' pieces
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.num_key_value_heads == 2
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = exported(input_ids=ids).logits
        reference = AutoModelForCausalLM.from_pretrained(ddp_run[0])(input_ids=ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    # the perplexity the two processes measured at the last step is the exported model's
    from gqa_convert.data.manifest import read_manifest
    from gqa_convert.data.tokens import read_head
    from gqa_convert.evaluation import perplexity_of

    (eval_folder,) = [folder for folder in (out / "data").iterdir() if read_manifest(folder)["job"]["head"]]
    ids = torch.from_numpy(read_head(eval_folder, 1000))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_perplexity" in r] == [0, STEPS // 2, STEPS]
    expected = perplexity_of(exported, ids, 32)
    assert logged[-1]["eval_tokens"] == expected["tokens"]
    assert logged[-1]["eval_perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    # step 0, measured by the two sharded processes: the starting model's and the teacher's perplexity
    student, teacher = (AutoModelForCausalLM.from_pretrained(model) for model in models_of(out))
    assert logged[0]["eval_perplexity"] == pytest.approx(perplexity_of(student, ids, 32)["perplexity"], rel=1e-4)
    assert logged[0]["source_perplexity"] == pytest.approx(perplexity_of(teacher, ids, 32)["perplexity"], rel=1e-4)
    assert (out / "recovery.png").is_file()


def test_fsdp2_sigkill_then_resume_on_two_and_on_one_process(models, fsdp2_run, tmp_path):
    reference = losses(fsdp2_run[0])
    out = tmp_path / "killed"
    extra = ["--strategy", "fsdp2", "--num-processes", 2, "--micro-batch-size", 1, "--grad-accum", 2]
    process = subprocess.Popen(
        cli(models[0], out, models[1], *extra),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) > SAVE_EVERY:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # kill -9 of the command alone: its launcher and workers follow it
    process.wait()
    deadline = time.time() + 30  # SIGKILL goes down to the launcher and the workers at once; a margin for load
    while processes_of(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_of(out), f"outlived the kill: {[describe(pid) for pid in processes_of(out)]}"
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert SAVE_EVERY < done < STEPS, "the run must be killed between a checkpoint and its end"
    shutil.copytree(out, tmp_path / "to-one")

    output = run(cli(models[0], out, models[1], *extra, "--resume"))
    assert "resumed from step-" in output
    same_world = worst_gap(losses(out), reference)
    output = run(
        cli(
            models[0],
            tmp_path / "to-one",
            models[1],
            "--strategy",
            "fsdp2",
            "--micro-batch-size",
            2,
            "--grad-accum",
            2,
            "--resume",
        )
    )
    first = int(re.search(r"resumed from step-(\d+)", output).group(1)) + 1
    other_world = worst_gap(losses(tmp_path / "to-one"), reference, first)
    print(f"resumed after SIGKILL: max relative loss gap {same_world:.3e} (2 processes), {other_world:.3e} (1 process)")
    assert same_world <= 1e-4 and other_world <= 1e-4
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "to-one").state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(fsdp2_run[0]).state_dict().items():
        torch.testing.assert_close(final[name], tensor, atol=1e-4, rtol=1e-3)


def processes_of(out: Path) -> list[int]:
    """The processes of the run writing OUT (the workers carry the plan, naming OUT, in their environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(out).encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def describe(pid: int) -> str:
    """A process's command line and state, for a failure message."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
        state = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State")]
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} {state} {command}"


WORKER = """
import sys, time
from gqa_convert.train.runtime import follow_owner
follow_owner(0.1)
print("ready", flush=True)
time.sleep(120)
"""

OWNER = r"""
import os, subprocess, sys, time
from gqa_convert.train.runtime import OWNER_ENV, process_identity
env = dict(os.environ)
if sys.argv[1] == "follow":
    env[OWNER_ENV] = process_identity(os.getpid())
worker = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env=env, stdout=subprocess.PIPE, start_new_session=True)
assert worker.stdout.readline() == b"ready\n"
print(worker.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["follow", "control"])
def test_a_worker_ends_with_its_command_whatever_stands_between(mode):
    """A worker in a session of its own, without the parent-death signal (as under a launcher slow to exit
    or a subreaper): once the command that owns it is killed, it ends within a second. The control,
    without the owner's identity, lives on: the watch is what ends it."""
    from gqa_convert.train.runtime import process_identity

    owner = subprocess.Popen([sys.executable, "-c", OWNER, mode, WORKER], stdout=subprocess.PIPE, env=ENV)
    worker = int(owner.stdout.readline())
    assert process_identity(worker) is not None
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    assert process_identity(owner.pid) is None  # reaped; a zombie counts as ended as well
    deadline = time.time() + (10 if mode == "follow" else 3)
    while process_identity(worker) is not None and time.time() < deadline:
        time.sleep(0.05)
    alive = process_identity(worker) is not None
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert alive == (mode == "control")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_out_folders_that_machines_do_not_share_are_refused(models, tmp_path):
    """Two machines on this host, each with its own OUT: one line, exit 2, on both. The data is a token
    folder (raw data would have machine rank 1 wait for tokens that never appear in its OUT)."""
    from gqa_convert.data.tokenize import TokenizeOptions, tokenize

    tokens = tmp_path / "tokens"
    tokenize(str(SAMPLE), tokens, TokenizeOptions(tokenizer=str(models[0])))
    port = free_port()
    machines = [
        "--data",
        tokens,
        "--num-processes",
        2,
        "--num-machines",
        2,
        "--main-process-ip",
        "127.0.0.1",
        "--main-process-port",
        port,
    ]
    processes = []
    for rank in (0, 1):
        command = cli(models[0], tmp_path / f"out{rank}", models[1], *machines, "--machine-rank", rank)
        processes.append(subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(2)  # rank 0 first: it hosts the rendezvous
    results = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 2, stderr[-3000:]
        # one line from gqa-convert, the last; torchrun may warn before it that it numbers machines itself
        lines = [line for line in stderr.strip().splitlines() if "node_rank is only used for static" not in line]
        assert len(lines) == 1 and "is not the same folder on every machine" in lines[0], stderr[-3000:]
