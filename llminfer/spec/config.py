"""`speculative_config`, as vLLM spells it: which proposer drafts tokens, and how many per step.

    LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    LLM(model, speculative_config={"model": "tiny-shakespeare-draft", "num_speculative_tokens": 3})
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
# vLLM's other methods, refused by name rather than as unknown words.
NOT_IMPLEMENTED = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "deepseek_mtp", "suffix", "ngram_gpu")
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str                      # "ngram" (prompt lookup) or "draft_model"
    num_speculative_tokens: int      # k: tokens drafted per request per step
    model: str | None = None         # the draft model, for "draft_model"
    prompt_lookup_min: int = 5       # shortest n-gram to look up, for "ngram"
    prompt_lookup_max: int = 5       # longest

    @classmethod
    def parse(cls, spec: dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """Check a vLLM-style dict (or pass a config through); every problem names the key and value.

        As in vLLM, "model" without "method" means a draft model, "model": "ngram" means n-gram lookup,
        and n-gram lookup with one bound given uses it for both (neither: 5 and 5)."""
        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        if not isinstance(spec, dict):
            raise ValueError(f"speculative_config must be a dict or None, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(KEYS), key=str)
        if unknown:
            raise ValueError(f"speculative_config has keys llminfer does not know: {unknown}; it takes {list(KEYS)}")
        method, model = spec.get("method"), spec.get("model")
        if method is None:
            method = "ngram" if model == "ngram" else "draft_model" if model is not None else None
        if method in NOT_IMPLEMENTED:
            raise ValueError(f"speculative method {method!r} is one of vLLM's that llminfer does not implement; "
                             f"llminfer has {list(METHODS)}")
        if method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {list(METHODS)} (or give a draft 'model'), "
                             f"got {method!r}")
        k = spec.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an int in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if method == "draft_model":
            if not isinstance(model, str) or not model:
                raise ValueError(f"the draft_model method needs a draft 'model' (a name or path), got {model!r}")
            return cls(method, k, model=model)
        low, high = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
        low, high = (5, 5) if low is None and high is None else (low if low is not None else high,
                                                                  high if high is not None else low)
        for name, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if low > high:
            raise ValueError(f"prompt_lookup_min={low} must be <= prompt_lookup_max={high}")
        return cls(method, k, prompt_lookup_min=low, prompt_lookup_max=high)
