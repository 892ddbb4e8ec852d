"""Wrong KV caches."""

import torch


class _Cache:
    """A contiguous cache with one flaw, chosen by the subclasses below."""

    def __init__(self, max_len, num_kv_heads, head_dim, dtype=torch.float32):
        self.k = torch.zeros(max_len, num_kv_heads, head_dim, dtype=dtype)
        self.v = torch.zeros(max_len, num_kv_heads, head_dim, dtype=dtype)
        self.max_len, self.length = max_len, 0

    def append(self, k, v):
        n = k.shape[0]
        if self.length + n > self.max_len:
            raise ValueError(f"{self.length + n} tokens do not fit in {self.max_len}")
        self.k[self.length: self.length + n] = k
        self.v[self.length: self.length + n] = v
        self.length += n
        return self.k[: self.length], self.v[: self.length]


class NeverAdvances(_Cache):
    """Forgets to advance the length: every append overwrites the start."""

    def append(self, k, v):
        n = k.shape[0]
        self.k[:n], self.v[:n] = k, v
        return self.k[:n], self.v[:n]


class ReturnsWholeBuffer(_Cache):
    """Returns all max_len slots, empty ones included."""

    def append(self, k, v):
        super().append(k, v)
        return self.k, self.v


class SwapsKeysAndValues(_Cache):
    def append(self, k, v):
        return super().append(v, k)


class NoCapacityCheck(_Cache):
    """Writes past the end: the slice silently shrinks, and the length runs past max_len."""

    def append(self, k, v):
        n = k.shape[0]
        room = self.k[self.length: self.length + n].shape[0]
        self.k[self.length: self.length + room], self.v[self.length: self.length + room] = k[:room], v[:room]
        self.length += n
        return self.k[: self.length], self.v[: self.length]


class OffByOne(_Cache):
    """Leaves a gap: the new tokens go one slot after the end."""

    def append(self, k, v):
        n = k.shape[0]
        if self.length + n + 1 > self.max_len:
            raise ValueError("full")
        self.k[self.length + 1: self.length + n + 1] = k
        self.v[self.length + 1: self.length + n + 1] = v
        self.length += n
        return self.k[: self.length], self.v[: self.length]


class StoresFloat32(_Cache):
    """Keeps its buffers in fp32 whatever dtype it was asked for."""

    def __init__(self, max_len, num_kv_heads, head_dim, dtype=torch.float32):
        super().__init__(max_len, num_kv_heads, head_dim, torch.float32)


WRONG = {
    "kv_cache_append": {
        "never advances the length": NeverAdvances,
        "returns the whole buffer": ReturnsWholeBuffer,
        "swaps keys and values": SwapsKeysAndValues,
        "no capacity check": NoCapacityCheck,
        "off by one slot": OffByOne,
        "ignores the dtype": StoresFloat32,
    },
}
