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


def _task_model(folder: Path, seed: int) -> Path:
    """A tiny random llama with its own trained tokenizer, for lm-eval tasks: weights at std 0.5 (far from
    uniform predictions, so that two seeds score differently), 512 positions (the shipped tasks' longest
    answers fit)."""
    import torch
    import transformers

    from tiny_models import save_tiny_tokenizer, tiny_config

    tokenizer = save_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    config = tiny_config("llama", vocab_size=len(tokenizer), max_position_embeddings=512)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def task_model(tmp_path_factory) -> Path:
    return _task_model(tmp_path_factory.mktemp("task-model") / "model", seed=0)


@pytest.fixture(scope="session")
def other_task_model(tmp_path_factory) -> Path:
    """The same shapes and tokenizer as task_model, other weights (a stand-in for a converted model)."""
    return _task_model(tmp_path_factory.mktemp("task-model-other") / "model", seed=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding the tiny trained tokenizer (tokenize tests)."""
    from tiny_models import save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
