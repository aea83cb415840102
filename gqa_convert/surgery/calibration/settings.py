"""The calibration settings of the calibrated methods and groupings, validated where they are built.

The defaults are the best recipe measured on SmolLM2-135M (docs/results.md): frequency-aware K merge,
V fitted to each query head's attended moment, joint o_proj solve (ridge chosen per layer),
sequential calibration, and on a GPU each layer refined toward the decoder block's output (on a CPU
that refinement would take most of the time, so it is left to --refine-steps, with a warning). The
old closed-form merge is `key_merge="complex", value_moment="plain", output_ridges=None,
sequential=False, refine_steps=0`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from gqa_convert.errors import GQAConvertError
from gqa_convert.options import Options

KEY_MERGES = ("frequency", "complex")
VALUE_MOMENTS = ("per-head", "attended", "plain")
OUTPUT_RIDGES = (0.1, 0.3, 1.0, 3.0, 10.0)
REFINE_TARGETS = ("attention", "block")  # refine.py: what a refined layer is fitted to
GPU_REFINE_STEPS = 100  # refinement steps per layer by default where the calibration runs on a GPU
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class Calibration(Options):
    """Calibration text and how the calibrated merge uses it."""

    data: str
    extra_data: tuple[str, ...] = ()  # texts of other domains; the tokens are shared equally, windows interleaved
    tokens: int = 16384
    seq_len: int = 512
    text_column: str = "text"
    # frequency: per layer, the complex per-pair merge or the low band (pairs rotating <= band_angle rad
    # over seq_len) merged as a linear map (projection or polar gauge), chosen by K-only attention error
    key_merge: str = "frequency"
    band_angle: float = 1.0
    # per-head: each query head's attended moment (what its values are averaged over), the shared V and
    # the o blocks solved alternately; attended: the head-averaged moment, one closed form; plain: the inputs
    value_moment: str = "per-head"
    # joint o_proj least squares: the relative ridges tried, per layer the best on the held-out quarter
    # of the calibration batches; None: no solve
    output_ridges: tuple[float, ...] | None = OUTPUT_RIDGES
    sequential: bool = True  # each layer calibrated on the outputs of the merged layers before it
    # Adam steps per layer fitting the merged attention to the original; None: GPU_REFINE_STEPS on a
    # GPU, 0 on a CPU (resolved())
    refine_steps: int | None = None
    refine_lr: float = 3e-4
    refine_target: str | None = None  # the decoder block's output (None, "block") or the attention's
    device: str = "auto"  # auto: cuda when available

    def check(self) -> None:
        if self.tokens < 1 or self.seq_len < 2:
            raise GQAConvertError("--calib-tokens must be positive and --calib-seq-len at least 2")
        if (self.refine_steps is not None and self.refine_steps < 0) or self.refine_lr <= 0:
            raise GQAConvertError("--refine-steps must be at least 0 and --refine-lr positive")
        if self.refine_target is not None and self.refine_steps == 0:
            warnings.warn("--refine-target is ignored with --refine-steps 0", stacklevel=3)
        if self.refine_target is not None and self.refine_target not in REFINE_TARGETS:
            raise GQAConvertError(
                f"unknown refine target '{self.refine_target}'; choose one of: {', '.join(REFINE_TARGETS)}"
            )
        if self.key_merge not in KEY_MERGES:
            raise GQAConvertError(f"unknown key merge '{self.key_merge}'; choose one of: {', '.join(KEY_MERGES)}")
        if self.value_moment not in VALUE_MOMENTS:
            raise GQAConvertError(
                f"unknown value moment '{self.value_moment}'; choose one of: {', '.join(VALUE_MOMENTS)}"
            )
        if not self.band_angle > 0:
            raise GQAConvertError("--band-angle must be positive (radians of rotation over --calib-seq-len)")
        if self.output_ridges is not None and (
            not self.output_ridges or not all(ridge >= 0 for ridge in self.output_ridges)
        ):
            raise GQAConvertError("--output-ridge must be at least 0 (or --no-output-solve to skip the o_proj solve)")
        if self.device.split(":")[0] not in DEVICES or (self.device.startswith(("auto:", "cpu:"))):
            raise GQAConvertError(f"unknown device '{self.device}'; choose auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda"):
            _check_cuda(self.device)

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.data, *self.extra_data)

    def resolved(self) -> Calibration:
        """The settings as run: the device chosen, the refinement steps and target decided (what the
        provenance records). On a CPU the GPU's default refinement is skipped, with a warning."""
        device = self.torch_device()
        steps = self.refine_steps
        if steps is None:
            steps = GPU_REFINE_STEPS if device.startswith("cuda") else 0
            if not steps:
                warnings.warn(
                    f"calibrating on the CPU: the block refinement a GPU runs by default is skipped "
                    f"(--refine-steps {GPU_REFINE_STEPS} runs it here, many times the calibration's time)",
                    stacklevel=3,
                )
        target = self.refine_target or ("block" if steps else None)
        return dataclasses.replace(self, device=device, refine_steps=steps, refine_target=target)

    def torch_device(self) -> str:
        """The device the calibration runs on: auto is cuda when one is visible, else cpu."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _check_cuda(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise GQAConvertError(f"--device {device}: no CUDA device is visible to torch; use --device cpu (or auto)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise GQAConvertError(
            f"--device {device}: torch sees {torch.cuda.device_count()} CUDA devices; choose cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
