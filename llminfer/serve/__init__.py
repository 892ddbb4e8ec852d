"""Serving: the engine behind an async interface (`AsyncLLM`) and an OpenAI-compatible HTTP server."""

from llminfer.serve.async_llm import AsyncLLM
from llminfer.serve.detokenizer import IncrementalDetokenizer

__all__ = ["AsyncLLM", "IncrementalDetokenizer"]
