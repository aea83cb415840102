"""The final model: the full state dict gathered (a collective), written by the main process as a
transformers folder in OUT with the source's dtype, its config, tokenizer and provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from gqa_convert import __version__
from gqa_convert.io.portable import make_tokenizer_portable, portable_config
from gqa_convert.io.provenance import new_record, read_record, write_record
from gqa_convert.io.sources import declared_dtype, load_tokenizer
from gqa_convert.train.checkpoints import read_metrics
from gqa_convert.train.settings import TrainPlan


def write_final_model(accelerator: Any, model: Any, plan: TrainPlan, steps: int, tokens: int) -> None:
    """Gather the full state dict on every rank, then the main process writes OUT."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        settings = plan.settings
        out = Path(settings.out)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True
        if getattr(unwrapped.config, "tie_word_embeddings", False):
            state_dict.pop("lm_head.weight", None)  # gathered state dicts untie it
        dtype = declared_dtype(Path(settings.model))
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        staging = out / ".final-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped.save_pretrained(staging, state_dict=state_dict, save_function=accelerator.save)
        config_path = staging / "config.json"
        saved = json.loads(config_path.read_text())
        saved["dtype"] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(portable_config(saved), indent=2, sort_keys=True) + "\n")
        load_tokenizer(settings.model).save_pretrained(staging)
        make_tokenizer_portable(staging)
        _write_provenance(staging, plan, steps, tokens)
        for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            stale.unlink()  # a stale single file beside new shards would break loading
        for file in staging.iterdir():
            shutil.move(str(file), out / file.name)
        staging.rmdir()
    accelerator.wait_for_everyone()


def _write_provenance(folder: Path, plan: TrainPlan, steps: int, tokens: int) -> None:
    settings = plan.settings
    record = read_record(Path(settings.model)) or new_record(settings.model, {})
    metrics = read_metrics(Path(settings.out) / "metrics.jsonl")
    record["uptrain"] = {
        "version": __version__,
        "model": str(settings.model),
        "arguments": vars(settings),
        "budget": plan.budget_origin,
        "steps": steps,
        "tokens": tokens,
        "final_loss": metrics[-1]["loss"] if metrics else None,
    }
    write_record(folder, record)
