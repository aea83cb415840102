"""What a conversion is asked to do, validated where it is built: the CLI and Python callers get the
same checks, before any work starts."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from gqa_convert.errors import GQAConvertError
from gqa_convert.options import Options, option
from gqa_convert.surgery.calibration.settings import Calibration
from gqa_convert.surgery.groupings import GROUPINGS, Grouping
from gqa_convert.surgery.methods import METHODS, Method
from gqa_convert.units import DTYPE_NAMES, parse_size

__all__ = ["Calibration", "ConversionOptions", "ExpandOptions", "PoolOptions"]


@dataclass(frozen=True, kw_only=True)
class ConversionOptions(Options):
    """How any conversion reads its source and writes its output."""

    dtype: str = option("auto", help="output dtype of floating tensors (auto: each tensor's own)", choices=DTYPE_NAMES)
    max_shard_size: str = option("5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    force: bool = option(False, help="replace a non-empty output folder this tool wrote")
    revision: str | None = option(None, help="Hub revision (branch, tag or commit) of a Hub id")
    allow_pickle: bool = option(False, help="read .bin (pickle) weights, with torch.load(weights_only=True)")

    def check(self) -> None:
        parse_size(self.max_shard_size)

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


@dataclass(frozen=True, kw_only=True)
class ExpandOptions(ConversionOptions):
    """expand: exact GQA/MQA -> MHA."""


@dataclass(frozen=True, kw_only=True)
class PoolOptions(ConversionOptions):
    """pool: merge the kv heads into kv_heads groups."""

    kv_heads: int
    method: str = "mean"
    grouping: str = "contiguous"
    seed: int = 0  # for method random
    calibration: Calibration | None = None  # needed by calibrated methods and groupings

    def check(self) -> None:
        super().check()
        if self.method not in METHODS:
            raise GQAConvertError(f"unknown method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if self.grouping not in GROUPINGS:
            raise GQAConvertError(f"unknown grouping '{self.grouping}'; choose one of: {', '.join(GROUPINGS)}")
        if self.calibrated and self.calibration is None:
            raise GQAConvertError(
                f"--method {self.method} --grouping {self.grouping} needs calibration text: pass --calib-data FILE"
            )
        refining = self.calibration is not None and (self.calibration.refine_steps or self.calibration.refine_target)
        if refining and not self.merge_method.needs_calibration:
            raise GQAConvertError("--refine-steps/--refine-target refine a calibrated merge: add --method aligned")
        if not self.calibrated and self.calibration is not None:
            warnings.warn(
                "--calib-data is ignored: mean/first/random with contiguous grouping use no calibration", stacklevel=3
            )

    @property
    def merge_method(self) -> Method:
        return METHODS[self.method]

    @property
    def head_grouping(self) -> Grouping:
        return GROUPINGS[self.grouping]

    @property
    def calibrated(self) -> bool:
        return self.merge_method.needs_calibration or self.head_grouping.needs_calibration
