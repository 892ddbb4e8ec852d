"""A draft model as proposer: a small model with the target's tokenizer guesses k tokens per request,
one batched forward pass per token.

Its keys and values live in a paged cache of its own, addressed by the *same* block tables as the
target's: block b of a request holds the target's and the draft's entries for the same positions. So the
block pool allocates, shares (prefix caching) and frees both at once, and rolling back rejected tokens is
the same for both: the entries past a request's verified length are simply overwritten later.
"""

from __future__ import annotations

import torch

from llminfer.attention.metadata import AttentionMetadata
from llminfer.engine.sequence import Sequence
from llminfer.kv.block_pool import BlockPool
from llminfer.kv.paged import PagedKVCache
from llminfer.sampling import process_logits
from llminfer.spec.proposer import Draft, Proposer


def check_draft_model(draft, target) -> None:
    """Refuse a draft the verifier could not compare with the target: another vocabulary, or a shorter context."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens and the target's "
                         f"{target.config.vocab_size}: a draft must share the target's tokenizer")
    if draft.config.max_position_embeddings < target.config.max_position_embeddings:
        raise ValueError(f"the draft model's context ({draft.config.max_position_embeddings} tokens) is shorter "
                         f"than the target's ({target.config.max_position_embeddings})")


class DraftModelProposer(Proposer):
    def __init__(self, model: torch.nn.Module, pool: BlockPool, num_speculative_tokens: int, max_model_len: int,
                 generator: torch.Generator, kv_cache_dtype: str = "auto"):
        super().__init__(num_speculative_tokens, max_model_len)
        param = next(model.parameters())
        self.model, self.pool, self.generator = model, pool, generator
        self.kv_cache = PagedKVCache(model.config, pool.num_blocks, pool.block_size, param.device, param.dtype,
                                     kv_cache_dtype)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> dict[Sequence, Draft]:
        # The draft writes entries up to position num_tokens + room - 2 (its last token is never fed back):
        # those slots must exist before it runs. A request whose blocks cannot grow gets no draft.
        rooms = {}
        for seq in seqs:
            room = self.room(seq)
            if room and self.pool.allocate(seq.block_table, seq.num_tokens + room - 1):
                rooms[seq] = room
        # The first round feeds each request every token the draft has not seen (its whole prompt, the first
        # time; after a verification the last verified tokens); each later round feeds the token just drafted.
        feeds = {}
        for seq in rooms:
            start = min(seq.num_draft_computed, seq.num_computed_tokens)   # rejected drafts do not count
            feeds[seq] = (seq.token_ids[start:], start)
        drafted: dict[Sequence, list[int]] = {seq: [] for seq in rooms}
        rows: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq in rooms}
        device = self.kv_cache.k.device
        while feeds:
            batch = list(feeds.items())
            lengths = [len(tokens) for _, (tokens, _) in batch]
            meta = AttentionMetadata.build(lengths, [start for _, (_, start) in batch],
                                           [seq.block_table for seq, _ in batch], self.pool.block_size, device)
            ids = torch.tensor([t for _, (tokens, _) in batch for t in tokens], device=device)
            last_rows = torch.tensor(lengths, device=device).cumsum(0) - 1
            logits = self.model(ids, self.kv_cache, meta, logits_indices=last_rows)
            feeds = {}
            for (seq, (tokens, start)), row in zip(batch, logits, strict=True):
                seq.num_draft_computed = start + len(tokens)
                token, probs = self._sample(seq, row)
                drafted[seq].append(token)
                if probs is not None:
                    rows[seq].append(probs)
                if len(drafted[seq]) < rooms[seq]:
                    feeds[seq] = ([token], seq.num_draft_computed)
        return {seq: Draft(tokens, torch.stack(rows[seq]) if rows[seq] else None) for seq, tokens in drafted.items()}

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The draft's token from its own logits with the request's temperature and truncation (argmax if
        greedy), and the distribution it was drawn from."""
        if seq.params.greedy:
            return int(logits.argmax()), None
        probs = process_logits(logits.float(), seq.params).softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=seq.generator or self.generator)), probs
