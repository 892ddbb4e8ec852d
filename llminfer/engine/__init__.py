"""Part II's engine: requests, the token-budget scheduler, the model runner, the engine loop, the LLM API."""

from llminfer.engine.llm import LLM
from llminfer.engine.llm_engine import LLMEngine, StepRecord
from llminfer.engine.outputs import CompletionOutput, RequestOutput
from llminfer.engine.scheduler import Scheduler
from llminfer.engine.sequence import Sequence

__all__ = ["LLM", "CompletionOutput", "LLMEngine", "RequestOutput", "Scheduler", "Sequence", "StepRecord"]
