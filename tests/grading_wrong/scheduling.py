"""Wrong scheduler steps."""


def _step(running, waiting, budget, max_num_seqs, waiting_first=False, no_chunk=None, slack=0, seq_cap=True,
          cap_counts_running=True, zero_entries=False):
    """One token-budget step with one switch flipped from the right rule (the defaults). `no_chunk`: what to do
    with a prompt that does not fit ("skip" it, or "stop" admitting)."""
    plan, budget = {}, budget + slack
    running_ids = [r.request_id for r in running]

    def serve_running():
        nonlocal budget
        for r in running:
            n = min(r.num_tokens - r.num_computed_tokens, budget)
            if n > 0 or zero_entries:
                plan[r.request_id] = n
            budget -= n

    def admit():
        nonlocal budget
        admitted = 0
        for w in waiting:
            if budget <= 0 and not zero_entries:
                break
            if seq_cap and (len(running_ids) if cap_counts_running else 0) + admitted >= max_num_seqs:
                break
            need = w.num_tokens - w.num_computed_tokens
            if need > budget and no_chunk == "skip":
                continue
            if need > budget and no_chunk == "stop":
                break
            n = min(need, budget)
            plan[w.request_id] = n
            budget -= n
            admitted += 1

    if waiting_first:
        admit()
        serve_running()
    else:
        serve_running()
        admit()
    return plan


WRONG = {
    "schedule_step": {
        "waiting before running": lambda r, w, b, s: _step(r, w, b, s, waiting_first=True),
        "no chunking: skips a prompt that does not fit": lambda r, w, b, s: _step(r, w, b, s, no_chunk="skip"),
        "no chunking: stops at a prompt that does not fit": lambda r, w, b, s: _step(r, w, b, s, no_chunk="stop"),
        "exceeds the budget by one": lambda r, w, b, s: _step(r, w, b, s, slack=1),
        "ignores max_num_seqs": lambda r, w, b, s: _step(r, w, b, s, seq_cap=False),
        "max_num_seqs counts only new requests": lambda r, w, b, s: _step(r, w, b, s, cap_counts_running=False),
        "lists requests that get 0 tokens": lambda r, w, b, s: _step(r, w, b, s, zero_entries=True),
    },
}
