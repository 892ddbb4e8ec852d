"""Answer key for the exercise `schedule_step` (chapter 8, scheduling): one step of the token-budget rule.

With plenty of KV memory (no preemption, no prefix cache): running requests first, in order, then waiting
ones in arrival order while fewer than max_num_seqs requests would run; a request that wants more than what
is left of the budget gets a chunk. Only requests that compute at least one token are in the plan.

Imports only `Sequence` from `llminfer.engine`, as the notebook does, for the type of the requests.
"""

from llminfer.engine import Sequence  # given by the notebook: the request type (used for annotations only)


def schedule_step(running: list[Sequence], waiting: list[Sequence], max_num_batched_tokens: int,
                  max_num_seqs: int) -> dict[str, int]:
    """{request_id: tokens to compute this step} under the token budget: running requests first, then
    waiting ones in order while fewer than max_num_seqs run; a prompt that does not fit gets a chunk."""
    budget = max_num_batched_tokens
    plan: dict[str, int] = {}

    # 1. Running requests, in their order: a decode wants 1 token, a chunked prefill the rest of its prompt.
    for seq in running:
        if budget == 0:
            break                             # budget spent: the rest compute nothing this step
        n = min(_wanted(seq), budget)
        plan[seq.request_id] = n
        budget -= n

    # 2. Waiting requests in arrival order, while budget is left and a slot is free (running ones count).
    num_running = len(running)
    for seq in waiting:
        if budget == 0 or num_running >= max_num_seqs:
            break                             # strictly in order: never skip ahead to a later request
        n = min(_wanted(seq), budget)         # what does not fit is a chunk; the rest comes in later steps
        plan[seq.request_id] = n
        budget -= n
        num_running += 1

    return plan


def _wanted(seq: Sequence) -> int:
    """Tokens the request still has to compute: its whole prompt if new, 1 if it decodes."""
    return seq.num_tokens - seq.num_computed_tokens
