"""Helpers the test modules share: running the CLI (in this process or as a command), the one-line
error check, folder snapshots, tiny models that calibration can run on, and the cut rules of
gqa_convert.data.cuts written out independently (a brute-force reading of their definition)."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import torch
import transformers
from typer.testing import CliRunner

from gqa_convert.cli import app
from gqa_convert.data import cuts
from gqa_convert.surgery.options import PoolOptions
from gqa_convert.surgery.recipes import RECIPES, Recipe

from tiny_models import fit_vocabulary, save_tiny_tokenizer, tiny_config

runner = CliRunner()
SAMPLE = Path(__file__).parent / "data" / "sample.txt"


def calibrated(kv_heads: int, recipe: object = "aligned", data: tuple = (SAMPLE,), **options: object) -> PoolOptions:
    """pool's options for a calibrated recipe on a tiny model: 1024 tokens of the sample text in windows
    of 64 unless given."""
    values = {"calib_tokens": 1024, "calib_seq_len": 64, **options}
    return PoolOptions(kv_heads=kv_heads, recipe=recipe, calib_data=tuple(map(str, data)), **values)


def with_settings(name: str, **sections: dict) -> Recipe:
    """A built-in recipe with some settings of its sections changed."""
    recipe = RECIPES[name]
    changed = {section: getattr(recipe, section).replace(**values) for section, values in sections.items()}
    return recipe.replace(name=f"{name}-changed", **changed)


def fails(args: list, *expected: str) -> str:
    """The command fails with one line on stderr that starts with 'error: ', exit 2, no traceback,
    and the line holds every expected fragment. Returns the line."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: "), message
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment in message, message
    return message


def cli(*args: object) -> list[str]:
    """The command line that runs gqa-convert in a new process."""
    return [sys.executable, "-m", "gqa_convert.cli", *map(str, args)]


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of a folder: file contents by hash, links by target, other kinds by type."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = "link:" + os.readlink(path)
        elif path.is_file() and not path.is_fifo():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "dir" if path.is_dir() else "special"
    return state


def refused(args: list, *expected: str, out: Path | None = None, source: Path | None = None) -> str:
    """One line, exit 2, OUT not created, the source exactly as it was."""
    before = snapshot(source) if source is not None else None
    message = fails(args, *expected)
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "work files left"
    if source is not None:
        assert snapshot(source) == before, "the source changed"
    return message


def build_calibratable(folder: Path, model_type: str, **overrides) -> transformers.PreTrainedModel:
    """A tiny model with a tokenizer (calibration needs one) and weights at std 0.1."""
    tokenizer = save_tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size=len(tokenizer), max_position_embeddings=256, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    fit_vocabulary(model, folder, model_type)
    model.save_pretrained(folder)
    return model


def save_byte_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges): the same ids on every tokenizers version."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return fast


def checkpoint_tensors(folder: Path, prefix: str = "model.causal_lm.") -> dict[str, torch.Tensor]:
    """The whole tensors of a checkpoint's state under `prefix`, assembled here from its pieces as the
    index (state.json) places them: an oracle independent of the loader's resharding."""
    import json

    from safetensors import safe_open

    index = json.loads((folder / "state.json").read_text())["tensors"]
    tensors = {}
    for name, entry in index.items():
        if not name.startswith(prefix):
            continue
        dtype = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64"}[entry["dtype"]])
        whole = torch.zeros(entry["size"], dtype=dtype)
        for chunk in entry["chunks"]:
            with safe_open(str(folder / chunk["file"]), "pt") as handle:
                piece = handle.get_tensor(chunk["key"])
            place = tuple(slice(o, o + n) for o, n in zip(chunk["offsets"], chunk["sizes"]))
            whole[place] = piece
        tensors[name.removeprefix(prefix)] = whole
    return tensors


_WHITESPACE = set(b"\t\n\x0b\x0c\r ")
_VISIBLE = re.compile(rb"[!-~\xc3-\xe0\xe4-\xf4]")


def reference_cuts(data: bytes) -> set[int]:
    """Every cut of a file holding `data`, position by position from the definition (slow: small
    files, with the module's sizes made small)."""
    piece, bound, lookback = cuts.PIECE_BYTES, cuts.BOUND, cuts.LOOKBACK

    def boundary(p: int) -> bool:
        return data[p] in _WHITESPACE and p + 1 < len(data) and _VISIBLE.match(data, p + 1) is not None

    def breaks(p: int) -> int:
        start = p
        while start > 0 and data[start - 1] in _WHITESPACE:
            start -= 1
        return data.count(b"\n", max(start, p - lookback + 1), p + 1)

    found = {p for p in range(len(data)) if boundary(p) and breaks(p) >= 2}
    for target in range(piece, len(data), piece):
        window = range(target, min(target + bound, len(data)))
        line = next((p for p in window if boundary(p) and breaks(p) >= 1), None)
        word = next((p for p in window if boundary(p)), None)
        char = next((p for p in range(target, min(target + 4, len(data))) if not 0x80 <= data[p] < 0xC0), target)
        found.add(line if line is not None else word if word is not None else char)
    return {cut for cut in found if 0 < cut < len(data)}


def partial_leftovers(folder: Path) -> list[str]:
    """Names of work folders or temporary files left anywhere under `folder`."""
    pattern = re.compile(r"\.(partial|old|tmp)$|\.tmp-|\.data-|\.dry-run-")
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if pattern.search(path.name))
