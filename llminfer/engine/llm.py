"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`.

Swapping `from llminfer import LLM, SamplingParams` for `from vllm import LLM, SamplingParams` runs
the same script on vLLM (for the arguments both accept).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput
from llminfer.models.loader import load_model
from llminfer.models.registry import default_model_name
from llminfer.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """'auto' (None: fp32 on CPU, bf16 on a GPU), a name like 'bfloat16', or a torch dtype."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto', one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


class LLM:
    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "auto",
                 device: str | torch.device | None = None, seed: int = 0, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True):
        self.model_name = model or default_model_name()
        self.model, self.tokenizer = load_model(self.model_name, device=device, dtype=parse_dtype(dtype))
        self.llm_engine = LLMEngine(
            self.model, self.tokenizer, block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, seed=seed)

    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes, so that a repeat of the same prompts computes them again."""
        return self.llm_engine.reset_prefix_cache()

    def generate(self, prompts: str | dict | list[str | dict],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        for i, params in enumerate(sampling_params):
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling_params[{i}] must be a SamplingParams, got {type(params).__name__}")
        engine, ids = self.llm_engine, []
        try:
            for prompt, params in zip(prompts, sampling_params, strict=True):
                ids.append(engine.add_request(None, prompt, params))
        except ValueError as exc:  # a malformed prompt: submit all or nothing
            for request_id in ids:
                engine.abort(request_id)
            raise ValueError(f"prompts[{len(ids)}]: {exc}") from exc
        wanted, done = set(ids), {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                for output in engine.step():
                    if output.finished and output.request_id in wanted:
                        done[output.request_id] = output
                        bar.update(1)
        return [done[i] for i in ids]
