"""Sampling parameters (vLLM's field names and defaults) and the sampler that implements them.

One step, in vLLM's order: penalties from the tokens seen so far, the min_tokens mask, then
either greedy argmax or temperature, top-k, top-p, min-p and a draw. Each transform maps logits
to logits, masking removed tokens with -inf, so the chapters can show what each one does to the
distribution. Stop strings are checked on the decoded text, logprobs on the raw logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The numeric fields of SamplingParams, grouped by the values they accept.
_NUMERIC_FIELDS = (
    ("an int", Integral, ("n", "top_k", "max_tokens", "min_tokens")),
    ("an int or None", (Integral, type(None)), ("seed", "logprobs", "prompt_logprobs")),
    ("a number", Real,
     ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")),
)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _as_list(name: str, value: object, item_type: type, kind: str) -> list:
    """None, one item, or a list or tuple of items, as a new list."""
    items = [] if value is None else [value] if isinstance(value, item_type) else value
    _require(isinstance(items, (list, tuple)) and all(isinstance(item, item_type) for item in items),
             f"{name} must be {kind}, a list of them, or None, got {value!r}")
    return list(items)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop, with vLLM's names and defaults.

    `temperature=0` means greedy; `top_k` 0 or -1, `top_p=1` and `min_p=0` switch truncation off.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: return token ids only (text stays ""), as benchmarks do

    def __post_init__(self) -> None:
        for kind, types, names in _NUMERIC_FIELDS:
            for name in names:
                value = getattr(self, name)
                _require(isinstance(value, types), f"{name} must be {kind}, got {value!r}")
        _require(self.n >= 1, f"n must be >= 1, got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        _require(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= -1, f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _require(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        _require(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _require(self.min_tokens <= self.max_tokens,
                 f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens}, max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"{name} must be >= 0, got {value}")
        for name in ("ignore_eos", "include_stop_str_in_output", "detokenize"):
            _require(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")
        self.stop = _as_list("stop", self.stop, str, "a str")
        _require(all(self.stop), f"stop strings must be non-empty, got {self.stop!r}")
        _require(self.detokenize or not self.stop, "stop strings need detokenize=True: they are found in the text")
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, Integral, "an int")
        _require(all(t >= 0 for t in self.stop_token_ids), f"stop_token_ids must be >= 0, got {self.stop_token_ids}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(
    logits: torch.Tensor, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int], params: SamplingParams
) -> torch.Tensor:
    """Discourage repeats in one request's logits [vocab]: the repetition penalty for every token seen in
    the prompt or the output, then the frequency and presence penalties for tokens of the output only."""
    if params.repetition_penalty == 1 and params.frequency_penalty == 0 and params.presence_penalty == 0:
        return logits
    vocab = logits.shape[-1]
    prompt = torch.as_tensor(prompt_token_ids, dtype=torch.long, device=logits.device)
    output = torch.as_tensor(output_token_ids, dtype=torch.long, device=logits.device)
    output_counts = torch.bincount(output, minlength=vocab)
    seen = (torch.bincount(prompt, minlength=vocab) > 0) | (output_counts > 0)
    # CTRL's rule: a seen token always becomes less likely, so a negative logit is multiplied, not divided.
    penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
    logits = torch.where(seen, penalised, logits)
    logits = logits - params.frequency_penalty * output_counts.to(logits.dtype)
    return logits - params.presence_penalty * (output_counts > 0).to(logits.dtype)


def apply_min_tokens(
    logits: torch.Tensor, num_output_tokens: int, params: SamplingParams, eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """Forbid ending (EOS unless `ignore_eos`, and `stop_token_ids`) until the output has `min_tokens` tokens."""
    if num_output_tokens >= params.min_tokens:
        return logits
    ending = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
    return logits.index_fill(-1, torch.tensor(ending, dtype=torch.long, device=logits.device), float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature: below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach p; the top one always stays.
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times that of the most likely token."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """All of the transforms of `params`, in order (for a non-greedy request)."""
    logits = apply_temperature(logits.float(), params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids [...] from logits [..., vocab]: argmax if greedy, else a seeded draw."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, params).softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A private random stream for a seeded request, so its draws do not depend on anything else."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
    eos_token_ids: Sequence[int],
) -> int:
    """One request's next token from its logits [vocab]: penalties, the min_tokens mask, then greedy or a draw."""
    logits = apply_penalties(logits.float(), prompt_token_ids, output_token_ids, params)
    logits = apply_min_tokens(logits, len(output_token_ids), params, eos_token_ids)
    return int(sample_next_token(logits, params, generator))


def find_stop(text: str, stop: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Cut the output at its first stop string (kept if `include`); return the text and that string, or None.

    Pass the decoded output so far, without the prompt. "First" is the first stop string to be complete
    reading left to right (the longer one on a tie), so the cut does not depend on how tokens split the text.
    """
    hits = [(start + len(s), start, s) for s in stop if (start := text.find(s)) >= 0]
    if not hits:
        return text, None
    end, start, found = min(hits)
    return text[: end if include else start], found


@dataclass
class Logprob:
    """A token's log probability under the model and its rank among all tokens (1 = most likely), as in vLLM."""

    logprob: float
    rank: int
    decoded_token: str | None = None


def top_logprobs(
    logits: torch.Tensor, token_id: int, k: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> dict[int, Logprob]:
    """The chosen token and the k most likely ones, from the model's raw logits [vocab] (before penalties,
    temperature or truncation, vLLM's default), so the numbers describe the model, not the sampler."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # in fp32: bf16 keeps only ~3 significant digits
    ids = [token_id] + torch.topk(logprobs, min(k, logprobs.shape[-1])).indices.tolist()
    values = logprobs[ids]
    # 1 + the number of strictly more likely tokens: the chosen token's true rank even outside the top k.
    ranks = 1 + (logprobs[None, :] > values[:, None]).sum(dim=-1)
    return {
        i: Logprob(value, rank, None if tokenizer is None else tokenizer.decode([i]))
        for i, value, rank in zip(ids, values.tolist(), ranks.tolist(), strict=True)
    }
