"""KV caches: where the keys and values of past tokens live between steps."""

from llminfer.kv.block_pool import Block, BlockPool, hash_block
from llminfer.kv.contiguous import ContiguousKVCache
from llminfer.kv.paged import PagedKVCache

__all__ = ["Block", "BlockPool", "ContiguousKVCache", "PagedKVCache", "hash_block"]
