"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`.

Swapping `from llminfer import LLM, SamplingParams` for `from vllm import LLM, SamplingParams` runs
the same script on vLLM (for the arguments both accept).

`generate` may be called from several threads at once: their requests share the engine's steps (a
lock keeps one step at a time) and each call gets back exactly its own outputs. Whatever ends a call
early, an exception or Ctrl-C, aborts every request that call submitted, so nothing is left running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llminfer.chat import render_conversations
from llminfer.engine.llm_engine import LLMEngine
from llminfer.engine.outputs import RequestOutput
from llminfer.kv.quantized import code_dtype
from llminfer.models.loader import load_checkpoint, load_tokenizer
from llminfer.models.registry import default_model_name, resolve_model_path
from llminfer.quant.checkpoint import checkpoint_method, load_gptq_model
from llminfer.quant.quantize import CALIBRATED, check_method, quantize_on_load
from llminfer.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16}

# Engine arguments vLLM scripts pass that llminfer does not implement, and what they mean there.
VLLM_ONLY = {
    "pipeline_parallel_size": "splits the layers over several GPUs",
    "data_parallel_size": "runs several copies of the model",
    "cpu_offload_gb": "keeps part of the weights in host memory",
    "swap_space": "swaps preempted requests' KV blocks to host memory (vLLM V0)",
    "tokenizer_mode": "chooses the slow, fast or Mistral tokenizer",
    "revision": "picks a revision of the Hub checkpoint",
    "enable_lora": "serves LoRA adapters",
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """'auto' (None: fp32 on CPU, bf16 on a GPU), a name like 'bfloat16', or a torch dtype."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto', one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
    return DTYPES[dtype]


def check_vllm_arguments(tensor_parallel_size: int, enforce_eager: bool, trust_remote_code: bool,
                         others: dict) -> None:
    """Accept what llminfer honours; refuse the rest with what the argument means in vLLM."""
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
    if tensor_parallel_size > 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} splits each layer over that many GPUs in "
                         "vLLM; llminfer runs the model on one device")
    for name, value in (("enforce_eager", enforce_eager), ("trust_remote_code", trust_remote_code)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    for name in others:
        if name in VLLM_ONLY:
            raise ValueError(f"{name}: in vLLM this argument {VLLM_ONLY[name]}; llminfer does not implement it")
        raise TypeError(f"LLM() got an unexpected keyword argument {name!r}")


class LLM:
    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "auto",
                 device: str | torch.device | None = None, seed: int | None = 0, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 tokenizer: str | Path | None = None, skip_tokenizer_init: bool = False,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, trust_remote_code: bool = False,
                 cpu_threads: int | None = None, speculative_config: dict | None = None,
                 quantization: str | None = None, kv_cache_dtype: str = "auto", **kwargs):
        """vLLM's arguments, where they mean the same. `tokenizer` loads the tokenizer from another path or
        Hub id; `skip_tokenizer_init=True` loads none (prompts are then token ids and outputs carry no
        text). `enforce_eager` (no CUDA graphs) is what llminfer always does; `trust_remote_code` changes
        nothing, because llminfer never runs code that comes with a checkpoint. `cpu_threads` fixes the
        CPU thread count; by default the engine measures which is fastest (`llminfer.engine.threads`).
        `speculative_config` is vLLM's: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min":
        a, "prompt_lookup_max": b} or {"model": "tiny-shakespeare-draft", "num_speculative_tokens": k}.
        `quantization` ("int8", "int4", "fp8", "gptq", "awq" or "w8a8") quantizes the decoder's linear layers
        as the model loads (`llminfer.quant.quantize_on_load`); vLLM's "gptq" and "awq" instead read weights
        quantized beforehand. A checkpoint whose config.json has a GPTQ quantization_config (`save_gptq`,
        AutoGPTQ, GPTQModel) or an AWQ one (AutoAWQ's gemm layout) loads as it is stored, as in vLLM;
        `quantization` must then be None or the checkpoint's method.
        `kv_cache_dtype` ("auto", "int8", "fp8", "fp8_e4m3" or "fp8_e5m2") stores the KV
        cache in one byte per value with a scale per token and head (`llminfer.kv.quantized`); vLLM's fp8
        cache has one scale per tensor or head instead, and no "int8"."""
        check_vllm_arguments(tensor_parallel_size, enforce_eager, trust_remote_code, kwargs)
        code_dtype(kv_cache_dtype)   # an unknown name fails before the model loads
        if not isinstance(skip_tokenizer_init, bool):
            raise ValueError(f"skip_tokenizer_init must be a bool, got {skip_tokenizer_init!r}")
        if quantization is not None:
            check_method(quantization)
        self.model_name = model or default_model_name()
        path = resolve_model_path(self.model_name)
        # A checkpoint quantized beforehand says so in its config.json (vLLM reads it the same way).
        stored = checkpoint_method(path)
        if stored is not None:
            if stored not in ("gptq", "awq"):
                raise ValueError(f"{path} is a {stored!r} checkpoint; llminfer loads quantized checkpoints in GPTQ's "
                                 "and AWQ's formats only (quant_method 'gptq' or 'awq')")
            if quantization not in (None, stored):
                raise ValueError(f"{path} holds {stored.upper()} weights; quantization={quantization!r} does not "
                                 f"match them (pass None or {stored!r})")
            self.model = load_gptq_model(path, device, parse_dtype(dtype), method=stored)
        else:
            self.model = load_checkpoint(path, device, parse_dtype(dtype))
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(
            resolve_model_path(tokenizer) if tokenizer else path)
        if quantization is not None and stored is None:
            calibration_tokenizer = self.tokenizer
            if calibration_tokenizer is None and quantization in CALIBRATED:
                calibration_tokenizer = load_tokenizer(resolve_model_path(tokenizer) if tokenizer else path)
            quantize_on_load(self.model, quantization, calibration_tokenizer)
        self.quantization = quantization if stored is None else stored
        self.llm_engine = LLMEngine(
            self.model, self.tokenizer, block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching, seed=seed, cpu_threads=cpu_threads,
            speculative_config=speculative_config, kv_cache_dtype=kv_cache_dtype)
        self._lock = threading.Lock()            # one engine step (or submission) at a time
        self._owned: set[str] = set()            # ids submitted by generate() calls still waiting for them
        self._done: dict[str, RequestOutput] = {}  # finished outputs, until their call picks them up
        self.served_by = None                    # an AsyncLLM now driving this engine (llminfer.serve)

    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes, so that a repeat of the same prompts computes them again."""
        with self._lock:
            return self.llm_engine.reset_prefix_cache()

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., tqdm] = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of OpenAI-style messages) or a list of them, as vLLM's `LLM.chat`:
        each is rendered by the chat template (`llminfer.chat.render_chat`), then run by `generate`."""
        prompts = render_conversations(self.tokenizer, messages, chat_template=chat_template,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message,
                                       chat_template_kwargs=chat_template_kwargs)
        return self.generate(prompts, sampling_params, use_tqdm)

    def generate(self, prompts: str | dict | list[str | dict],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | Callable[..., tqdm] = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts.

        `use_tqdm` may be a tqdm-like callable, as in vLLM. A malformed batch submits nothing."""
        if self.served_by is not None and self.served_by.is_running:
            raise RuntimeError("this LLM's engine is being served by an AsyncLLM, which steps it from its own "
                               "thread; submit through the AsyncLLM, or shut it down first")
        prompts, sampling_params = self._check_batch(prompts, sampling_params)
        engine, ids, done, bar = self.llm_engine, [], {}, None
        try:
            with self._lock:
                for i, (prompt, params) in enumerate(zip(prompts, sampling_params, strict=True)):
                    try:
                        ids.append(engine.add_request(None, prompt, params))
                    except ValueError as exc:
                        raise ValueError(f"prompts[{i}]: {exc}") from exc
                    self._owned.add(ids[-1])
            if use_tqdm:
                bar = (use_tqdm if callable(use_tqdm) else tqdm)(total=len(ids), desc="Processed prompts",
                                                                  dynamic_ncols=True)
            while len(done) < len(ids):
                with self._lock:
                    for request_id in ids:
                        if request_id not in done and request_id in self._done:
                            done[request_id] = self._done.pop(request_id)
                            self._owned.discard(request_id)
                            if bar is not None:
                                bar.update(1)
                    if len(done) < len(ids):
                        self._collect(engine.step())
            return [done[i] for i in ids]
        finally:  # normal return, an error or Ctrl-C: whatever this call submitted and did not collect ends now
            if bar is not None:
                bar.close()
            with self._lock:
                for request_id in ids:
                    if request_id in self._owned:
                        engine.abort(request_id)
                        self._owned.discard(request_id)
                        self._done.pop(request_id, None)

    def _collect(self, outputs: list[RequestOutput]) -> None:
        """Keep the finished outputs that some generate() call is waiting for (this one or another)."""
        for output in outputs:
            if output.finished and output.request_id in self._owned:
                self._done[output.request_id] = output

    @staticmethod
    def _check_batch(prompts, sampling_params) -> tuple[list, list[SamplingParams]]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a str, a dict, or a list of them, got {type(prompts).__name__}")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)) or len(sampling_params) != len(prompts):
            count = len(sampling_params) if isinstance(sampling_params, (list, tuple)) else type(sampling_params)
            raise ValueError(f"got {count} sampling params for {len(prompts)} prompts")
        for i, params in enumerate(sampling_params):
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling_params[{i}] must be a SamplingParams, got {type(params).__name__}")
        return list(prompts), list(sampling_params)
