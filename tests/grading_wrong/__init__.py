"""Plausible wrong answers to each exercise, kept so the tests can assert the grader rejects every one."""

from grading_wrong import (
    anatomy,
    attention,
    batching,
    kv_cache,
    paged_kv,
    performance,
    positions,
    prefix_caching,
    quantization,
    sampling,
    scheduling,
    serving,
    speculative,
)

# exercise id -> {what is wrong: the wrong implementation}
WRONG = {**sampling.WRONG, **attention.WRONG, **positions.WRONG, **kv_cache.WRONG, **performance.WRONG,
         **paged_kv.WRONG, **batching.WRONG, **scheduling.WRONG, **prefix_caching.WRONG, **anatomy.WRONG,
         **speculative.WRONG, **quantization.WRONG, **serving.WRONG}
