"""The model runner: turns one scheduled step into tensors, runs the model, and samples.

The step's tokens are flattened into one batch with no padding: each request contributes the
tokens it was scheduled to compute. Requests computing a single token (decodes) go first, so
attention can hand them to the decode kernel and the rest to the prefill kernel. Only the rows
that need logits go through the LM head: the last token of each request that samples this step,
and every token of a request that asked for prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llminfer.attention.metadata import AttentionMetadata
from llminfer.engine.sequence import Sequence
from llminfer.kv.paged import PagedKVCache
from llminfer.sampling import Logprob, next_token, top_logprobs


@dataclass
class ModelOutput:
    sampled: dict[Sequence, int] = field(default_factory=dict)
    logprobs: dict[Sequence, dict[int, Logprob]] = field(default_factory=dict)
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
            input_ids += seq.token_ids[start:start + n]
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                prompt_rows.append((seq, start, len(rows), n))
                rows += range(first_row, first_row + n)
            if start + n == seq.num_tokens:  # every token is computed: the last one's logits give the next
                if not rows or rows[-1] != first_row + n - 1:
                    rows.append(first_row + n - 1)
                samplers.append((seq, len(rows) - 1))
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
        plain = [(seq, row) for seq, row in samplers if is_plain_greedy(seq)]
        if plain:
            tokens = logits[[row for _, row in plain]].argmax(dim=-1).tolist()
            out.sampled.update((seq, token) for (seq, _), token in zip(plain, tokens, strict=True))
        for seq, row in samplers:
            try:  # one request's sampling going wrong must not cost the others their tokens
                if seq not in out.sampled:
                    out.sampled[seq] = next_token(logits[row], seq.params, seq.generator or self.generator,
                                                  seq.prompt_token_ids, seq.output_token_ids, self.eos_ids)
                if seq.params.logprobs is not None:
                    out.logprobs[seq] = top_logprobs(logits[row], out.sampled[seq], seq.params.logprobs)
            except Exception as exc:  # noqa: BLE001
                out.sampled.pop(seq, None)
                out.errors[seq] = f"sampling failed: {type(exc).__name__}: {exc}"
