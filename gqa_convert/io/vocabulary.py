"""Token ids against a model's vocabulary, checked before any forward pass: a tokenizer whose ids can
reach config.vocab_size (ids past the embedding table crash a forward, or read another row on some
devices), and a token folder whose largest id does."""

from __future__ import annotations

from typing import Any

from gqa_convert.errors import GQAConvertError


def largest_token_id(tokenizer: Any) -> int:
    """The largest id the tokenizer can give (its vocabulary with the added tokens)."""
    return max(max(tokenizer.get_vocab().values(), default=0), len(tokenizer) - 1)


def config_vocab_size(config: Any) -> int | None:
    """config.vocab_size, or None where the config has no usable one."""
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def check_tokenizer_fits(tokenizer: Any, config: Any, model: object) -> None:
    """Refuse a tokenizer that can give ids the model has no embedding for (one line naming both)."""
    vocab_size = config_vocab_size(config)
    if vocab_size is None:
        return
    largest = largest_token_id(tokenizer)
    if largest >= vocab_size:
        raise GQAConvertError(
            f"the tokenizer of {model} gives ids up to {largest}, but its config.vocab_size is {vocab_size}: ids "
            f"from {vocab_size} on have no embedding; save the model's own tokenizer with it, or resize the "
            "embeddings (model.resize_token_embeddings(len(tokenizer))) and save again"
        )


def check_ids_fit(largest: int, vocab_size: int | None, data: object, model: object) -> None:
    """Refuse token data whose largest id is not below the model's vocabulary size."""
    if vocab_size is not None and largest >= vocab_size:
        raise GQAConvertError(
            f"{data} holds token id {largest}, but {model} has {vocab_size} ids (config.vocab_size): "
            f"tokenize the data again with --tokenizer {model}"
        )
