"""Calibration: what the source model computes on calibration text, one decoder layer at a time.

It collects statistics and never changes a weight of the output: the text's token ids (texts), the
model run one layer at a time (model), each layer's statistics, immutable once collected
(statistics), and the teacher's and student's residual streams through the layers (stream). The
merge methods in gqa_convert.surgery consume these statistics; nothing here imports them.
"""

from gqa_convert.calibration.settings import CalibrationSettings, check_device, resolve_device
from gqa_convert.calibration.statistics import ATTENDED_MOMENTS, AttentionCall, LayerStatistics
from gqa_convert.calibration.stream import CalibrationStream
from gqa_convert.calibration.texts import TEXT_SOURCES, CalibrationText, TextSource, calibration_ids

__all__ = [
    "ATTENDED_MOMENTS",
    "TEXT_SOURCES",
    "AttentionCall",
    "CalibrationSettings",
    "CalibrationStream",
    "CalibrationText",
    "LayerStatistics",
    "TextSource",
    "calibration_ids",
    "check_device",
    "resolve_device",
]
