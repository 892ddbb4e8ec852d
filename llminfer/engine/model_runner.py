"""The model runner: turns one scheduled step into tensors, runs the model, and samples.

The step's tokens are flattened into one batch with no padding: each request contributes the
tokens it was scheduled to compute. Requests computing a single token (decodes) go first, so
attention can hand them to the decode kernel and the rest to the prefill kernel. Only the rows
that need logits go through the LM head: the last token of each request that samples this step,
every token of a request that asked for prompt logprobs, and, with speculative decoding, the
last token and every draft token of a request whose draft is verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llminfer.attention.metadata import AttentionMetadata
from llminfer.engine.sequence import Sequence
from llminfer.kv.paged import PagedKVCache
from llminfer.sampling import Logprob, next_token, next_token_probs, penalized_logits, top_logprobs
from llminfer.spec.verify import greedy_accept, verify_draft


@dataclass
class ModelOutput:
    # The tokens each request gained: one, or with a draft the accepted drafts and one more.
    sampled: dict[Sequence, list[int]] = field(default_factory=dict)
    logprobs: dict[Sequence, list[dict[int, Logprob]]] = field(default_factory=dict)  # one entry per token
    # Per request: the position of its first computed token and the logits of every computed token.
    prompt_logits: dict[Sequence, tuple[int, torch.Tensor]] = field(default_factory=dict)
    errors: dict[Sequence, str] = field(default_factory=dict)  # requests whose sampling failed, and why


def is_plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing that changes the logits first: one batched argmax serves all such requests."""
    p = seq.params
    return (p.greedy and p.repetition_penalty == 1 and p.frequency_penalty == 0 and p.presence_penalty == 0
            and seq.num_output_tokens >= p.min_tokens)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, generator: torch.Generator):
        self.model, self.kv_cache = model, kv_cache
        self.device = next(model.parameters()).device
        self.eos_ids = model.config.eos_token_ids
        self.generator = generator  # the engine's random stream, for requests without a seed

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]]) -> ModelOutput:
        batch = sorted(batch, key=lambda item: item[1] != 1)  # decodes first (a stable sort)
        input_ids, rows, samplers, prompt_rows = [], [], [], []
        for seq, n in batch:
            start = seq.num_computed_tokens
            first_row = len(input_ids)
            drafted = seq.num_draft_tokens
            new_tokens = seq.token_ids[start:start + n]
            input_ids += (new_tokens + seq.draft.token_ids)[:n] if drafted else new_tokens
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_rows.append((seq, start, len(rows), n))
                rows += range(first_row, first_row + n)
            if start + n == seq.num_tokens + drafted:  # every token is computed: the last 1 + drafted rows score
                wanted = range(first_row + n - 1 - drafted, first_row + n)
                if rows and rows[-1] == wanted[-1]:    # already there (prompt logprobs)
                    samplers.append((seq, len(rows) - len(wanted)))
                else:
                    samplers.append((seq, len(rows)))
                    rows += wanted
        meta = AttentionMetadata.build(
            [n for _, n in batch], [seq.num_computed_tokens for seq, _ in batch],
            [seq.block_table for seq, _ in batch], self.kv_cache.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        logits = self.model(ids, self.kv_cache, meta,
                            logits_indices=torch.tensor(rows, dtype=torch.long, device=self.device))
        out = ModelOutput()
        for seq, start, row, n in prompt_rows:
            out.prompt_logits[seq] = (start, logits[row:row + n])
        if samplers:
            self._sample(samplers, logits, out)
        return out

    def _sample(self, samplers: list[tuple[Sequence, int]], logits: torch.Tensor, out: ModelOutput) -> None:
        # Plain greedy requests, with or without a draft: one argmax over all their scored rows.
        plain = [(seq, row) for seq, row in samplers if is_plain_greedy(seq)]
        if plain:
            best = logits[[row + i for seq, row in plain for i in range(1 + seq.num_draft_tokens)]].argmax(-1).tolist()
            start = 0
            for seq, _ in plain:
                n = 1 + seq.num_draft_tokens
                drafted = seq.draft.token_ids if seq.draft is not None else []
                out.sampled[seq] = greedy_accept(drafted, best[start:start + n])
                start += n
        for seq, row in samplers:
            try:  # one request's sampling going wrong must not cost the others their tokens
                if seq.draft is not None and seq not in out.sampled:
                    out.sampled[seq] = self._verify(seq, logits[row:row + 1 + seq.num_draft_tokens])
                elif seq not in out.sampled:
                    out.sampled[seq] = [next_token(logits[row], seq.params, seq.generator or self.generator,
                                                   seq.prompt_token_ids, seq.output_token_ids, self.eos_ids)]
                if seq.params.logprobs is not None:
                    out.logprobs[seq] = [top_logprobs(logits[row + i], token, seq.params.logprobs)
                                         for i, token in enumerate(out.sampled[seq])]
            except Exception as exc:  # noqa: BLE001
                out.sampled.pop(seq, None)
                out.errors[seq] = f"sampling failed: {type(exc).__name__}: {exc}"

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> list[int]:
        """Check a request's draft against the target's logits at its 1 + k positions (rejection sampling).
        Position i sees the drafts before it as output, so penalties and min_tokens apply exactly as they
        would have one token at a time."""
        params, draft = seq.params, seq.draft
        outputs = seq.output_token_ids

        def target(i: int) -> torch.Tensor:
            context = outputs + draft.token_ids[:i]
            if params.greedy:
                return penalized_logits(logits[i], params, seq.prompt_token_ids, context, self.eos_ids)
            return next_token_probs(logits[i], params, seq.prompt_token_ids, context, self.eos_ids)

        return verify_draft(draft, target, params.greedy, seq.generator or self.generator)
