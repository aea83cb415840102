"""How a recipe calibrates (its `calibration` section), and the device a calibration runs on."""

from __future__ import annotations

from dataclasses import dataclass

from gqa_convert.calibration.self_generated import OPENINGS
from gqa_convert.calibration.texts import TEXT_SOURCES
from gqa_convert.errors import GQAConvertError
from gqa_convert.options import FileOptions, option

DEVICES = ("auto", "cpu", "cuda")
# The calibration holds every window's activations of one layer (teacher's, student's and the layer's
# outputs): 2^20 tokens of a 7B model's hidden size are about 50 GB.
MAX_TOKENS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class CalibrationSettings(FileOptions):
    """The calibration a recipe runs on (pool's --calib-tokens and --calib-seq-len override the sizes)."""

    text: str = option(
        "user",
        choices=lambda: TEXT_SOURCES,
        help="where the calibration text comes from: "
        + "; ".join(f"{source.name}: {source.help}" for source in TEXT_SOURCES.values()),
    )
    tokens: int = option(
        16384, min=1, max=MAX_TOKENS, help="calibration tokens (every window's activations of a layer are held)"
    )
    seq_len: int = option(512, min=2, help="calibration window length (use the context length the model will serve)")
    openings: str = option(
        "auto",
        choices=lambda: OPENINGS,
        help="text self: how the model's sequences start: bos (the beginning-of-text token), random (it and one "
        "random token, as LLM-QAT), chat (the chat template around a request for a kind of text), auto (chat "
        "and random alternately; random without a chat template)",
    )
    document_tokens: int = option(
        256,
        min=2,
        max=MAX_TOKENS,
        help="text self: the length of each sequence the model writes; a window holds its documents end to "
        "end (seq_len / document_tokens of them; at most a window's length): more, shorter documents are more "
        "varied text",
    )
    temperature: float = option(1.0, above=0, max=10, help="text self: sampling temperature (1: the model's own)")
    top_p: float = option(1.0, above=0, max=1, help="text self: nucleus sampling mass (1: every token)")
    seed: int = option(0, min=0, help="text self: the sampling seed (the same text for the same seed and model)")
    sequential: bool = option(
        True, help="each layer calibrated on the outputs of the merged layers before it (not the source's)"
    )


def check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:N, and a CUDA device must be visible."""
    if device.split(":")[0] not in DEVICES or device.startswith(("auto:", "cpu:")):
        raise GQAConvertError(f"unknown device '{device}'; choose auto, cpu, cuda or cuda:N")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise GQAConvertError(f"--device {device}: no CUDA device is visible to torch; use --device cpu (or auto)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise GQAConvertError(
            f"--device {device}: torch sees {torch.cuda.device_count()} CUDA devices; choose cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}"
        )


def resolve_device(device: str) -> str:
    """The device a calibration runs on: auto is cuda when one is visible, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
