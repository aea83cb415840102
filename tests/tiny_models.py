"""Tiny random models of every supported architecture, built with transformers' own config classes.

Weights are redrawn at std 0.1 (not the 0.02 init) so that a wrong head order or a wrong merge moves
the logits far beyond the tolerances the tests use.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 4, 2, 2, 128
_COMMON = dict(
    hidden_size=HIDDEN,
    intermediate_size=96,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# model_type -> (config class name, extra kwargs). Biases and kv-dependent norms switched on where they exist.
TINY = {
    "llama": ("LlamaConfig", dict(attention_bias=True)),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=32, attention_bias=True)),
    "gemma": ("GemmaConfig", dict(head_dim=32)),
    "gemma2": ("Gemma2Config", dict(head_dim=32)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=32)),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5, qk_layernorm=True)),
    "phi3": ("Phi3Config", {}),
    "stablelm": ("StableLmConfig", dict(qk_layernorm=True, use_qkv_bias=True, partial_rotary_factor=0.25)),
    "olmo": ("OlmoConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", dict(attention_bias=True)),
    "cohere": ("CohereConfig", dict(use_qk_norm=True)),
    "starcoder2": ("Starcoder2Config", dict(use_bias=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=2, num_experts_per_tok=1)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    ),
    "falcon": ("FalconConfig", dict(num_kv_heads=KV_HEADS, new_decoder_architecture=True, bias=True)),
}


def tiny_config(model_type: str, **overrides: object) -> transformers.PretrainedConfig:
    class_name, extra = TINY[model_type]
    kwargs = {**_COMMON, **extra, **overrides}
    if model_type == "falcon":
        kwargs.pop("num_key_value_heads")
        kwargs.pop("intermediate_size")
    return getattr(transformers, class_name)(**kwargs)


def build_tiny(folder: Path, model_type: str, seed: int = 0, **overrides: object) -> transformers.PreTrainedModel:
    """Save a tiny random model to `folder` (safetensors) and return it in eval mode, float32."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    model.eval()
    model.save_pretrained(folder)
    return model


def load(folder: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model: transformers.PreTrainedModel, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def save_tiny_tokenizer(folder: Path, vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the sample text: a real tokenizer with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    sample = Path(__file__).parent / "data" / "sample.txt"
    tokenizer.train([str(sample)], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return fast


def fit_vocabulary(model: transformers.PreTrainedModel, folder: Path, model_type: str) -> None:
    """Grow the embeddings to every id of the tokenizer saved in `folder` as transformers loads it for
    this model type: the type decides the tokenizer class, which may add tokens (qwen2's adds one), and
    gqa-convert refuses a tokenizer larger than its model. The weights drawn before stay as they are."""
    tiny_config(model_type).save_pretrained(folder)  # the model's own config.json replaces it
    loaded = len(transformers.AutoTokenizer.from_pretrained(folder))
    if loaded > model.config.vocab_size:
        model.resize_token_embeddings(loaded, mean_resizing=False)


def build_trainable(folder: Path, model_type: str = "llama", **overrides: object) -> transformers.PreTrainedModel:
    """A tiny model with its own tokenizer, at the init scale (std 0.02), ready to train."""
    tokenizer = save_tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = tiny_config(model_type, vocab_size=len(tokenizer), max_position_embeddings=256, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fit_vocabulary(model, folder, model_type)
    model.save_pretrained(folder)
    return model
