"""Architectures as data: the schema of a row, the table of supported models, and the config rules
for the kv head count."""

from gqa_convert.arch.config_rules import (
    check_head_counts,
    check_seq_len,
    head_dim_of,
    kv_cache_bytes_per_token,
    kv_heads_of,
    rotary_dim,
    valid_kv_heads,
    write_kv_heads,
)
from gqa_convert.arch.schema import Architecture, KvTensor, Layout, QueryTensor, TensorKind
from gqa_convert.arch.table import ARCHITECTURES, UNSUPPORTED, architecture_for

__all__ = [
    "ARCHITECTURES",
    "UNSUPPORTED",
    "Architecture",
    "KvTensor",
    "Layout",
    "QueryTensor",
    "TensorKind",
    "architecture_for",
    "check_head_counts",
    "check_seq_len",
    "head_dim_of",
    "kv_cache_bytes_per_token",
    "kv_heads_of",
    "rotary_dim",
    "valid_kv_heads",
    "write_kv_heads",
]
