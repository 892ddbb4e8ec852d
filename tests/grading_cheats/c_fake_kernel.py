"""A "Triton kernel" that is the library's paged attention reference behind a fake launch."""

from triton.runtime.interpreter import InterpretedFunction

from llminfer.kernels import paged_attention_decode_reference


class _Launch:
    def __call__(self, q, k_cache, v_cache, block_tables, seq_lens, out, scale, *rest, **meta):
        result = paged_attention_decode_reference(q.float(), k_cache.float(), v_cache.float(), block_tables,
                                                  seq_lens, scale, int(seq_lens.max()))
        out.copy_(result.to(out.dtype))


class _FakeKernel(InterpretedFunction):
    def __init__(self):
        pass

    def __getitem__(self, grid):
        return _Launch()


paged_decode_kernel = _FakeKernel()
