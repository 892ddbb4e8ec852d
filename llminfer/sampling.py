"""Sampling parameters (vLLM's field names and defaults) and the sampler that implements them.

One step: penalties from the tokens seen so far, the min_tokens mask, then either greedy argmax or
temperature, top-k, top-p, min-p and a draw. Each transform maps logits to logits, masking removed
tokens with -inf, so the chapters can show what each one does to the distribution. Stop strings are
checked on the decoded text, logprobs on the raw logits.

The order of the truncations is llminfer's own: top-k, then top-p, then min-p (`process_logits`). vLLM's V1
sampler (vllm/v1/sample/sampler.py) also starts with temperature, but then applies min-p, its built-in
argmax-invariant logits processor, before top-k and top-p. With only one of them set the order is moot, and
min-p commutes with top-k; it matters when min-p and top-p are combined. Min-p compares each probability with
the largest one, a ratio that renormalising does not change, so applied last (here) it keeps exactly the
tokens that it and top-p would each keep on their own. Applied first (vLLM), it removes the tail before top-p
sums the probabilities, so the kept tokens reach p sooner and top-p may keep fewer: for probabilities
(0.5, 0.3, 0.1, 0.1), min_p=0.25 and top_p=0.6, llminfer keeps the first two tokens and vLLM only the first.

Every field is checked when the object is built and again when a request is submitted (`validate`),
because an object can be changed after it was built; a bad value raises ValueError naming it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The numeric fields of SamplingParams, grouped by the values they accept (bools are refused: True is an
# int to Python, but `max_tokens=True` is a mistake, not a request for one token).
_NUMERIC_FIELDS = (
    ("an int", Integral, ("n", "top_k", "min_tokens")),
    ("an int or None", (Integral, type(None)), ("max_tokens", "seed", "logprobs", "prompt_logprobs")),
    ("a number", Real,
     ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")),
)
MAX_N = 1024                  # completions per request; vLLM's limit is VLLM_MAX_N_SEQUENCES (16384 by default)
MAX_SEED = 2**64 - 1          # torch.Generator takes seeds in [0, 2**64)
MIN_TEMPERATURE = 1e-2        # smaller positive temperatures are raised to this, as vLLM does (its _MAX_TEMP)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _as_list(name: str, value: object, item_type: type, kind: str) -> list:
    """None, one item, or a list or tuple of items, as a new list."""
    items = [] if value is None else [value] if isinstance(value, item_type) else value
    _require(isinstance(items, (list, tuple)) and all(isinstance(item, item_type) for item in items),
             f"{name} must be {kind}, a list of them, or None, got {value!r:.200}")
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
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    logprobs: int | None = None         # -1: every token of the vocabulary
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: return token ids only (text stays ""), as benchmarks do

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (ValueError naming the first bad one) and put lists in canonical form.

        vLLM's special values: `seed=-1` means no seed, `max_tokens=None` means up to the context, and
        `logprobs=-1` / `prompt_logprobs=-1` mean the whole vocabulary."""
        for kind, types, names in _NUMERIC_FIELDS:
            for name in names:
                value = getattr(self, name)
                _require(isinstance(value, types) and not isinstance(value, bool),
                         f"{name} must be {kind}, got {value!r}")
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            value = getattr(self, name)
            _require(math.isfinite(value), f"{name} must be a finite number, got {value}")
        _require(1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        _require(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= -1, f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _require(self.max_tokens is None or self.max_tokens >= 1,
                 f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        _require(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens,
                 f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens}, max_tokens={self.max_tokens}")
        if self.seed == -1:
            self.seed = None
        # Sample i of a request with n > 1 uses seed + i, so the last one must fit too.
        _require(self.seed is None or 0 <= self.seed <= MAX_SEED - (self.n - 1),
                 f"seed must be None, -1 or in [0, 2**64 - n] (here n={self.n}), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or value >= -1, f"{name} must be >= 0, or -1 for the whole vocabulary, got {value}")
        for name in ("ignore_eos", "include_stop_str_in_output", "detokenize"):
            _require(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")
        self.stop = _as_list("stop", self.stop, str, "a str")
        _require(all(self.stop), f"stop strings must be non-empty, got {self.stop!r}")
        _require(self.detokenize or not self.stop, "stop strings need detokenize=True: they are found in the text")
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, Integral, "an int")
        _require(not any(isinstance(t, bool) for t in self.stop_token_ids) and all(t >= 0 for t in self.stop_token_ids),
                 f"stop_token_ids must be ints >= 0, got {self.stop_token_ids}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse stop token ids the model cannot produce (checked where the vocabulary is known)."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        _require(not bad, f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")

    def clone(self) -> SamplingParams:
        """A deep copy, so that changing it leaves the original alone (vLLM's name)."""
        return copy.deepcopy(self)

    @staticmethod
    def from_optional(**fields) -> SamplingParams:
        """Build from keyword arguments where None means "the default" (vLLM's helper for request bodies in
        which absent fields arrive as None). `seed`, `max_tokens`, `logprobs` and `prompt_logprobs` keep
        None as a value, because None means something for them."""
        keep_none = {"seed", "max_tokens", "logprobs", "prompt_logprobs", "stop", "stop_token_ids"}
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None or k in keep_none})

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
    """Divide by the temperature: below 1 sharpens the distribution, above 1 flattens it.

    Temperatures below MIN_TEMPERATURE are raised to it, as vLLM does, and logits that overflow to +inf
    (a huge repetition penalty can do that) are brought back to the largest float: the distribution is
    then the limit it tends to, shared among the largest logits, instead of NaN."""
    logits = logits / max(temperature, MIN_TEMPERATURE)
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


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
    """All of the transforms of `params`, in order (for a non-greedy request): temperature, top-k, top-p,
    min-p. vLLM V1 applies min-p before top-k and top-p; the module docstring says when that changes the
    result."""
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
    logits = process_logits(logits, params)
    if bool((logits == float("-inf")).all(dim=-1).any()):
        raise ValueError("every token is excluded (min_tokens forbids all of the remaining ones)")
    probs = logits.softmax(dim=-1)
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
    logits = penalized_logits(logits, params, prompt_token_ids, output_token_ids, eos_token_ids)
    return int(sample_next_token(logits, params, generator))


def penalized_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """One request's logits [vocab] after the penalties and the min_tokens mask: what greedy takes the argmax
    of, and what temperature and truncation start from. A row with every token excluded is refused."""
    logits = apply_penalties(logits.float(), prompt_token_ids, output_token_ids, params)
    logits = apply_min_tokens(logits, len(output_token_ids), params, eos_token_ids)
    if bool((logits == float("-inf")).all()):
        raise ValueError("every token is excluded (min_tokens forbids all of the remaining ones)")
    return logits


def next_token_probs(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """The distribution [vocab] that `next_token` draws from for a sampling request: penalties, the
    min_tokens mask, temperature, top-k, top-p and min-p, then softmax. Speculative decoding's
    verifier needs it whole, to compare it with the draft's."""
    logits = process_logits(penalized_logits(logits, params, prompt_token_ids, output_token_ids, eos_token_ids),
                            params)
    return logits.softmax(dim=-1)


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
    """The chosen token and the k most likely ones (k=-1: every token), from the model's raw logits [vocab]
    (before penalties, temperature or truncation, vLLM's default), so the numbers describe the model, not
    the sampler. With a tokenizer each entry also carries its text (`decoded_token`)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # in fp32: bf16 keeps only ~3 significant digits
    vocab = logprobs.shape[-1]
    ids = [token_id] + torch.topk(logprobs, vocab if k == -1 else min(k, vocab)).indices.tolist()
    values = logprobs[ids]
    # 1 + the number of strictly more likely tokens: the chosen token's true rank even outside the top k,
    # counted by a binary search in the sorted negated logprobs (memory O(vocab), even for k=-1).
    ranks = 1 + torch.searchsorted(torch.sort(-logprobs).values, -values, side="left")
    texts = [None] * len(ids) if tokenizer is None else tokenizer.batch_decode([[i] for i in ids])
    return {
        i: Logprob(value, rank, text)
        for i, value, rank, text in zip(ids, values.tolist(), ranks.tolist(), texts, strict=True)
    }
