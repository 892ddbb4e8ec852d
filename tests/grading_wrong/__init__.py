"""Plausible wrong answers to each exercise, kept so the tests can assert the grader rejects every one."""

from grading_wrong import attention, kv_cache, performance, positions, sampling

# exercise id -> {what is wrong: the wrong implementation}
WRONG = {**sampling.WRONG, **attention.WRONG, **positions.WRONG, **kv_cache.WRONG, **performance.WRONG}
