"""KV caches: where the keys and values of past tokens live between steps."""

from llminfer.kv.contiguous import ContiguousKVCache

__all__ = ["ContiguousKVCache"]
