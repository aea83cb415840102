"""The learning-rate schedule: linear warmup, cosine to the floor at the last step."""

from __future__ import annotations

import math

import pytest

from gqa_convert.train.loop import learning_rate


def test_warmup_then_cosine_to_the_floor():
    rates = [learning_rate(step, 100, 1e-3, 0.1, warmup_steps=10) for step in range(100)]
    assert rates[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(1e-3)  # the peak right after warmup
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # then never rises
    assert rates[-1] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert learning_rate(99 + 1, 100, 1e-3, 0.1, warmup_steps=10) == pytest.approx(1e-4)  # the floor
    middle = learning_rate(55, 100, 1e-3, 0.1, warmup_steps=10)  # halfway through the decay
    assert middle == pytest.approx(1e-4 + 0.9e-3 * 0.5)


def test_default_warmup_is_two_percent_and_at_least_one_step():
    assert learning_rate(0, 1000, 1.0, 0.0, None) == pytest.approx(1 / 20)
    assert learning_rate(19, 1000, 1.0, 0.0, None) == pytest.approx(1.0)
    assert learning_rate(0, 10, 1.0, 0.0, None) == pytest.approx(1.0)  # round(0.2) -> at least 1
