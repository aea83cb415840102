"""Training checkpoints (full state through Accelerate, collective on every rank), the metrics log,
and the export of the final model as a transformers folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"  # written last: a checkpoint without it was cut short and is ignored


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(accelerator: Any, out: Path, step: int, trainer_state: dict[str, int]) -> None:
    """Every rank must call this: save_state gathers sharded (FSDP/DeepSpeed) state."""
    folder = checkpoint_dir(out, step)
    if accelerator.is_main_process and folder.exists():  # left by a run killed mid-save
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
        (folder / COMPLETE).write_text("")
    accelerator.wait_for_everyone()


def complete_checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / COMPLETE).exists())


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: Path, keep: int) -> None:
    for folder in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop the lines of steps after the checkpoint: they are trained again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _source_dtype(model_folder: Path) -> torch.dtype:
    config = json.loads((model_folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def write_final_model(accelerator: Any, model: Any, config: Any, state: Any) -> None:
    """Gather the full state dict (collective), then the main process writes a transformers folder
    into OUT: weights in the source's dtype, config, tokenizer and provenance."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        out = Path(config.out)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True
        if getattr(unwrapped.config, "tie_word_embeddings", False):
            state_dict.pop("lm_head.weight", None)  # gathered state dicts untie it
        dtype = _source_dtype(Path(config.model))
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        staging = out / ".final-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped.save_pretrained(staging, state_dict=state_dict, save_function=accelerator.save)
        config_path = staging / "config.json"
        saved = json.loads(config_path.read_text())
        saved["dtype"] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(config.model).save_pretrained(staging)
        _write_provenance(staging, config, state)
        for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            stale.unlink()  # a stale single file beside new shards would break loading
        for file in staging.iterdir():
            shutil.move(str(file), out / file.name)
        staging.rmdir()
    accelerator.wait_for_everyone()


def _write_provenance(folder: Path, config: Any, state: Any) -> None:
    from gqa_convert import __version__

    source = Path(config.model) / "gqa_convert.json"
    record = json.loads(source.read_text()) if source.exists() else {"tool": "gqa-convert"}
    metrics = Path(config.out) / "metrics.jsonl"
    last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.exists() and metrics.read_text() else {}
    arguments = {k: v for k, v in vars(config).items() if not k.endswith("_file")}
    record["uptrain"] = {"version": __version__, "model": str(config.model), "arguments": arguments,
                         "steps": state.step, "tokens": state.tokens, "final_loss": last.get("loss")}  # fmt: skip
    (folder / "gqa_convert.json").write_text(json.dumps(record, indent=2) + "\n")
