"""llminfer: a small, readable, fast LLM inference engine, and the companion of the book."""

from llminfer.device import default_device, default_dtype
from llminfer.engine import LLM, CompletionOutput, LLMEngine, RequestOutput
from llminfer.engine.inputs import TextPrompt, TokensPrompt
from llminfer.generate import Generation, generate, generate_tokens, generate_tokens_no_cache
from llminfer.models.loader import load_model
from llminfer.models.registry import default_model_name
from llminfer.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "Generation",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "TextPrompt",
    "TokensPrompt",
    "default_device",
    "default_dtype",
    "default_model_name",
    "generate",
    "generate_tokens",
    "generate_tokens_no_cache",
    "load_model",
]
