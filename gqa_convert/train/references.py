"""The reference figures of the recovery curve, measured before the first step on the held-out tokens:
the starting point's perplexity (the converted model's, evaluated by the loop) and the source model's:
--source-perplexity when given, else the teacher's (the unconverted source under distillation), else
none. Recorded in metrics.jsonl's step-0 row as `source_perplexity`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from gqa_convert.evaluation import perplexity_of
from gqa_convert.train.losses import LossParts, head_losses


class _TeacherAsModel:
    """The frozen teacher seen as a model with a loss, as perplexity_of calls one: its final hidden
    states through its head (gathered by the strategy while read), in the chunked losses."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.training = False

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.strategy.teacher.parameters()

    def eval(self) -> _TeacherAsModel:
        return self

    def train(self, mode: bool = True) -> _TeacherAsModel:
        return self

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> LossParts:
        with self.strategy.autocast():
            hidden = self.strategy.teacher(input_ids)
            with self.strategy.teacher_head() as head:
                predicted = hidden[:, :-1].reshape(-1, hidden.shape[-1])
                return head_losses(predicted, head, labels[:, 1:].reshape(-1))


def source_reference(strategy: Any, eval_ids: torch.Tensor, settings: Any, accelerator: Any) -> dict[str, float]:
    """{"source_perplexity": ...} when it is stated or a teacher can measure it; {} otherwise."""
    if settings.source_perplexity is not None:
        return {"source_perplexity": settings.source_perplexity}
    if strategy.teacher is None:
        return {}
    result = perplexity_of(
        _TeacherAsModel(strategy), eval_ids, settings.seq_len, settings.micro_batch_size, accelerator
    )
    return {"source_perplexity": round(result["perplexity"], 4)}
