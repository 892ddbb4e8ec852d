"""Answer key for the exercise `block_allocator` (chapter 6, paged KV memory).

A pool of KV cache blocks named 0 .. num_blocks - 1. Every block has a reference count: how many block
tables hold it. A block with count 0 is free. Operations check everything before they change anything,
so a refused `allocate` or `free` leaves the allocator exactly as it was.
"""

from collections import Counter, deque


class BlockAllocator:
    """KV cache blocks 0 .. num_blocks - 1, each with a reference count: how many block tables hold it."""

    def __init__(self, num_blocks: int):
        self._counts = [0] * num_blocks
        # The free ids, in the order they will be handed out. Freed blocks join at the back.
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks no table holds."""
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._counts[block_id]

    def allocate(self, n: int) -> list[int] | None:
        """n free blocks, each now held once; None, taking nothing, if fewer than n are free."""
        if n > len(self._free):
            return None                       # all or nothing: check first, take nothing
        ids = [self._free.popleft() for _ in range(n)]
        for block_id in ids:
            self._counts[block_id] = 1
        return ids

    def share(self, block_id: int) -> None:
        """One more table holds this block (it must be in use): its count goes up by one."""
        if self._counts[block_id] == 0:
            raise ValueError(f"block {block_id} is free: only a block in use can be shared")
        self._counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; at 0 it is free again. ValueError, changing nothing, if a
        block would be freed more often than it is held."""
        # Validate the whole call first: a block listed k times must be held at least k times.
        for block_id, times in Counter(block_ids).items():
            if times > self._counts[block_id]:
                raise ValueError(f"block {block_id} freed {times} time(s) but held {self._counts[block_id]} time(s)")
        for block_id in block_ids:
            self._counts[block_id] -= 1
            if self._counts[block_id] == 0:
                self._free.append(block_id)   # no table holds it any more: it may be handed out again
