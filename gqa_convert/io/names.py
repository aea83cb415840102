"""The names of the files this tool writes into an output folder, in one table: the output guard
replaces a folder only when everything in it is one of them (gqa_convert.io.output)."""

from __future__ import annotations

from gqa_convert.io.provenance import PROVENANCE_FILE

# Files that travel with the weights, copied from the source folder by an allow-list.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "*.tiktoken",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "LICENSE*",
    "LICENCE*",
    "license*",
    "NOTICE*",
    "USE_POLICY*",
)
# What an uptraining run writes into OUT before its provenance exists (see gqa_convert.train).
TRAINING_MARKERS = ("metrics.jsonl", "checkpoints")
# Every name this tool writes at the top of an output folder. A name added to any output must be
# added here (a test checks every command's output against it).
OWNED_NAMES = (
    # a model: weights, config, provenance, model card, side files, what its calibration ran on
    "config.json",
    "README.md",
    PROVENANCE_FILE,
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    *SIDE_FILES,
    "calibration",
    # a token folder
    "manifest.json",
    "job.json",
    "shard-*",
    # an uptraining run: metrics, checkpoints, tokenized data, plots, report logs, and what a run
    # killed at the wrong moment leaves (the export's staging, the shared-folder probe, a trimmed log)
    *TRAINING_MARKERS,
    "data",
    "recovery.png",
    ".recovery.png.*.tmp",  # recovery.png being redrawn
    "runs",
    ".export-tmp",
    ".visible-*",
    ".metrics.jsonl.tmp",
)
