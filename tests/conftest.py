import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny


@pytest.fixture
def src(tmp_path) -> Path:
    """A tiny llama checkpoint: 4 query heads, 2 kv heads, untied lm_head."""
    build_tiny(tmp_path / "src", "llama")
    return tmp_path / "src"
