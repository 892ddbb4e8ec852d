"""Speculative decoding: proposers draft tokens, the model scores them in one pass, the verifier keeps an
exact prefix. `make_proposer` builds what `speculative_config` asks for."""

from __future__ import annotations

import torch

from llminfer.kv.block_pool import BlockPool
from llminfer.spec.config import SpeculativeConfig
from llminfer.spec.draft_model import DraftModelProposer, check_draft_model
from llminfer.spec.metrics import SpecStats
from llminfer.spec.ngram import NgramProposer, find_ngram_continuation
from llminfer.spec.proposer import Draft, Proposer
from llminfer.spec.verify import verify_draft

__all__ = ["Draft", "DraftModelProposer", "NgramProposer", "Proposer", "SpecStats", "SpeculativeConfig",
           "find_ngram_continuation", "load_draft_model", "make_proposer", "verify_draft"]


def load_draft_model(config: SpeculativeConfig | None, target: torch.nn.Module) -> torch.nn.Module | None:
    """The draft model `config` names, on the target's device and in its dtype (None without one)."""
    if config is None or config.method != "draft_model":
        return None
    from llminfer.models.loader import load_checkpoint
    from llminfer.models.registry import resolve_model_path

    param = next(target.parameters())
    draft = load_checkpoint(resolve_model_path(config.model), param.device, param.dtype)
    check_draft_model(draft, target)
    return draft


def make_proposer(config: SpeculativeConfig, draft: torch.nn.Module | None, pool: BlockPool, max_model_len: int,
                  generator: torch.Generator, kv_cache_dtype: str = "auto") -> Proposer:
    """The proposer for `config`: n-gram lookup, or the already loaded draft model (its cache in `kv_cache_dtype`,
    like the target's)."""
    if config.method == "ngram":
        return NgramProposer(config.num_speculative_tokens, max_model_len, config.prompt_lookup_min,
                             config.prompt_lookup_max)
    return DraftModelProposer(draft, pool, config.num_speculative_tokens, max_model_len, generator, kv_cache_dtype)
