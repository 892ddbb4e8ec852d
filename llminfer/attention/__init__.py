"""Attention over a KV cache: the metadata that describes a batch, and the reference backend."""

from llminfer.attention.metadata import AttentionMetadata
from llminfer.attention.reference import cache_attention, write_kv

__all__ = ["AttentionMetadata", "cache_attention", "write_kv"]
