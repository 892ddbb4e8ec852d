"""The prompt shapes `LLM.generate` and `LLMEngine.add_request` accept, with vLLM's names.

A prompt is a plain `str`, or one of these dicts: `TextPrompt` holds text, `TokensPrompt` token ids
(for example from another tokenizer, or for a checkpoint loaded with `skip_tokenizer_init=True`).
"""

from __future__ import annotations

from typing import TypedDict

from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]   # the text the ids came from, reported back in the output if given
