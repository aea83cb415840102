"""Is every tensor the model needs in the checkpoint? The model is built from its config on the meta
device (no memory, no data) and its parameters and persistent buffers are compared with the
checkpoint's tensor names: a missing one is an error naming it (transformers would fill it with
random values), an unknown one is carried over with a warning.

Names are compared in both forms transformers accepts: the model's own (e.g. fused MoE experts) and
the checkpoint form save_pretrained writes (e.g. one tensor per expert). Tied parameters (lm_head
tied to the embeddings) need only one of their names."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from gqa_convert.errors import GQAConvertError, one_line

_LISTED = 5  # names quoted in a message


Alternatives = list[tuple[str, ...]]  # a requirement is met when every name of one tuple is present


def check_tensor_names(config: Any, names: list[str], where: str) -> None:
    """Raise if a tensor the config's model needs is absent; warn about tensors it does not have."""
    present = set(names)
    required = required_tensors(config)
    missing = [name for alternatives in required for name in _missing(alternatives, present)]
    if missing:
        raise GQAConvertError(
            f"{where} lacks {len(missing)} tensor{'s' * (len(missing) > 1)} that a {config.model_type} model with "
            f"this config needs: {_quote(missing)}; the checkpoint is incomplete: re-download it (or fix its index)"
        )
    known = {name for alternatives in required for form in alternatives for name in form}
    extra = [name for name in names if name not in known]
    if extra:
        warnings.warn(
            f"{len(extra)} tensor{'s' * (len(extra) > 1)} of {where} are not part of a {config.model_type} model "
            f"and are carried over unchanged: {_quote(extra)}",
            stacklevel=2,
        )


def required_tensors(config: Any) -> list[Alternatives]:
    """One entry per parameter (its tied names together) and persistent buffer: each of its names in
    both forms, the model's own and the checkpoint names save_pretrained writes for it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    try:
        with torch.device("meta"), _without_zero3_init():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # transformers raises many types for configs it cannot build
        raise GQAConvertError(
            f"a {config.model_type} model cannot be built from this config: {one_line(error)}"
        ) from None
    state = model.state_dict()  # parameters (tied ones under each name) and persistent buffers
    tied: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    groups = list(tied.values())
    parameters = {name for group in groups for name in group}
    groups += [[name] for name in state if name not in parameters]  # persistent buffers
    saved = _checkpoint_names(model, state, revert_weight_conversion)
    return [[form for name in group for form in ((name,), saved[name])] for group in groups]


def _without_zero3_init() -> contextlib.AbstractContextManager:
    """Inside a DeepSpeed ZeRO-3 run transformers builds every model under deepspeed.zero.Init, which
    cannot partition meta tensors; transformers skips it inside its own set_zero3_state context (the one
    it uses against nested zero.Init)."""
    from transformers import modeling_utils

    return getattr(modeling_utils, "set_zero3_state", contextlib.nullcontext)()


def _checkpoint_names(model: Any, state: dict[str, Any], revert: Any) -> dict[str, tuple[str, ...]]:
    """The names save_pretrained writes for each state dict entry (most models: the same name)."""
    if set(revert(model, dict(state))) == set(state):
        return {name: (name,) for name in state}
    return {name: tuple(revert(model, {name: tensor})) for name, tensor in state.items()}


def _missing(alternatives: Alternatives, present: set[str]) -> list[str]:
    """Nothing when one form is complete; else what the checkpoint form of the first name lacks."""
    if any(form and all(name in present for name in form) for form in alternatives):
        return []
    return [name for name in alternatives[1] if name not in present] or list(alternatives[0])


def _quote(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
