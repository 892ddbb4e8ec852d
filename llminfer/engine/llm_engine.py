"""The engine loop: requests come in with `add_request`, every `step` schedules, runs the model
once, appends one token to each request that finished computing, and reports what changed.

It owns the paged KV cache and its block pool, the scheduler and the model runner, and records
a trace of every step (who ran, how many tokens, blocks in use, preemptions, prefix hits) for
the chapters to draw.

One request never harms another: parameters are checked again at submission (on a private copy),
and whatever goes wrong with one request's sampling, stop check or text ends that request with
`finish_reason="error"` and the reason, gives its blocks back, and leaves the rest of the step alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import torch

from llminfer.engine.interrupts import deferred_interrupt
from llminfer.engine.model_runner import ModelRunner
from llminfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from llminfer.engine.scheduler import Scheduler
from llminfer.engine.sequence import Sequence
from llminfer.engine.threads import ThreadTuner, borrowed_threads, step_work
from llminfer.generate import check_prompt, encode_prompt, stop_token_ids
from llminfer.kv.block_pool import BlockPool
from llminfer.kv.paged import PagedKVCache, size_kv_pool
from llminfer.kv.quantized import code_dtype
from llminfer.sampling import MAX_SEED, Logprob, SamplingParams, find_stop, make_generator, top_logprobs
from llminfer.spec import SpecStats, SpeculativeConfig, load_draft_model, make_proposer


@dataclass
class StepRecord:
    """One engine step, as the scheduler decided it and the runner executed it."""

    step: int
    start: float                 # seconds since `LLMEngine.start_time` (metrics use the same perf_counter clock)
    duration: float
    scheduled: dict[str, int]    # request id -> tokens computed this step
    prefix_hits: dict[str, int]  # request id -> prompt tokens found in the prefix cache, for admitted requests
    preempted: list[str]
    finished: list[str]
    num_used_blocks: int
    num_waiting: int
    num_running: int
    threads: int | None = None   # CPU threads the model ran on (None on a GPU)
    spec: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # request id -> (drafted, accepted)
    draft_seconds: float = 0.0   # of `duration`, the time spent drafting for the next step


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer, *, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, seed: int | None = 0, scheduler_cls: type[Scheduler] = Scheduler,
                 cpu_threads: int | None = None, speculative_config: dict | SpeculativeConfig | None = None,
                 kv_cache_dtype: str = "auto"):
        """`scheduler_cls` swaps the scheduling policy (a `Scheduler` subclass), as the batching chapter does.
        `seed` seeds the draws of requests without a seed of their own (None: a random seed). On a CPU,
        `cpu_threads` fixes torch's thread count for the steps; None lets the engine measure which count
        is fastest under the machine's current load (`llminfer.engine.threads`), using at most the count
        torch has when the engine is built. `speculative_config` (vLLM's dict) turns on speculative decoding.
        `kv_cache_dtype` "int8" or "fp8" (vLLM's names, also "fp8_e4m3", "fp8_e5m2") stores one byte per cached
        value and a scale per row (`llminfer.kv.quantized`); "auto" keeps the model's dtype."""
        config = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = max_model_len or config.max_position_embeddings
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens), ("max_model_len", self.max_model_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
        if cpu_threads is not None and (not isinstance(cpu_threads, int) or isinstance(cpu_threads, bool)
                                        or cpu_threads < 1):
            raise ValueError(f"cpu_threads must be None or a positive int, got {cpu_threads!r}")
        if self.max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context of "
                             f"{config.max_position_embeddings} tokens")
        code_dtype(kv_cache_dtype)   # raises for an unknown name, before anything is allocated
        self.kv_cache_dtype = kv_cache_dtype
        param = next(model.parameters())
        self.device, dtype = param.device, param.dtype
        self.speculative_config = SpeculativeConfig.parse(speculative_config)
        # A draft model is loaded before the pool is sized: its entries share the target's blocks.
        draft = load_draft_model(self.speculative_config, model)
        models = [model] if draft is None else [model, draft]
        num_blocks = size_kv_pool(models, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization, block_size,
                                  max_num_seqs, max_num_batched_tokens, self.max_model_len, kv_cache_dtype)
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(
                f"a KV pool of {num_blocks} blocks x {block_size} tokens holds {num_blocks * block_size} tokens, "
                f"less than one request of max_model_len={self.max_model_len}: give it more memory or lower "
                "max_model_len")
        self.kv_cache = PagedKVCache(config, num_blocks, block_size, self.device, dtype, kv_cache_dtype)
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = scheduler_cls(self.pool, max_num_seqs, max_num_batched_tokens)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.runner = ModelRunner(model, self.kv_cache, self.generator)
        on_cpu = self.device.type == "cpu"
        self.cpu_threads = cpu_threads if on_cpu else None
        self.thread_tuner = ThreadTuner(torch.get_num_threads()) if on_cpu and cpu_threads is None else None
        self.proposer = (make_proposer(self.speculative_config, draft, self.pool, self.max_model_len, self.generator,
                                       kv_cache_dtype)
                         if self.speculative_config is not None else None)
        self.spec_stats = SpecStats()
        self.requests: dict[str, Sequence] = {}   # every unfinished sequence, by id
        # Parallel sampling (n > 1): a request runs as n sequences, reported together under the request's id.
        self._samples: dict[str, list[Sequence]] = {}   # request id -> its n sequences, until all finish
        self._request_of: dict[str, str] = {}           # sequence id -> request id, for those sequences
        self._failed: list[Sequence] = []        # rejected at submission; reported by the next step
        self._ids = itertools.count()
        self.trace: list[StepRecord] = []
        self.start_time = time.perf_counter()

    # --- requests in ---------------------------------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | dict, params: SamplingParams | None = None) -> str:
        """Queue a request. Invalid parameters raise here; a prompt the model cannot take (empty, too long,
        unknown token ids) makes a request that fails with that reason at the next step.

        With `params.n > 1` the request runs as n sequences with ids `"{i}_{request_id}"` (as in vLLM), each
        with seed `seed + i` when a seed is given, and its outputs carry all n completions."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params = params.clone()   # a private copy: changing the caller's object later changes nothing here
        params.validate()
        params.check_vocabulary(self.model.config.vocab_size)
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer, and this engine has none (skip_tokenizer_init)")
        if request_id is not None and not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str or None, got {type(request_id).__name__}")
        request_id = str(next(self._ids)) if request_id is None else request_id
        text, token_ids = self._tokenize(prompt)
        if params.n == 1:
            self._check_new_id(request_id)
            self._add_sequence(request_id, text, token_ids, params)
            return request_id
        ids = [f"{i}_{request_id}" for i in range(params.n)]
        for sequence_id in [request_id, *ids]:
            self._check_new_id(sequence_id)
        samples = []
        for i, sequence_id in enumerate(ids):
            seed = None if params.seed is None else params.seed + i
            one = dataclasses.replace(params, n=1, seed=seed)
            samples.append(self._add_sequence(sequence_id, text, token_ids, one))
            self._request_of[sequence_id] = request_id
        self._samples[request_id] = samples
        return request_id

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self._samples:
            raise ValueError(f"request id {request_id!r} is already running")

    def _add_sequence(self, request_id: str, text: str | None, token_ids: list[int],
                      params: SamplingParams) -> Sequence:
        seq = Sequence(request_id, text, list(token_ids), params, frozenset(stop_token_ids(self.model, params)),
                       make_generator(params, self.device))
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # the first token has no context to be predicted from
        vocab = self.model.config.vocab_size
        try:
            check_prompt(token_ids, self.max_model_len)
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        except ValueError as exc:
            seq.error = str(exc)
            seq.finish("error")
            self._failed.append(seq)
            return seq
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def _tokenize(self, prompt: str | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("cannot pass text prompts when the engine has no tokenizer (skip_tokenizer_init): "
                                 "pass {'prompt_token_ids': [...]}")
            return prompt, encode_prompt(self.tokenizer, prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in ids):
                raise ValueError(f"prompt_token_ids must be a list of ints, got {ids!r:.80}")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._tokenize(prompt["prompt"])
        raise ValueError(f"a prompt is a str or a dict with 'prompt_token_ids' or 'prompt', got {prompt!r:.80}")

    def abort(self, request_id: str) -> None:
        """Stop a request (all n sequences of one with n > 1) now and give its blocks back; unknown or
        finished ids are ignored. A request that failed at submission is dropped before it is reported."""
        seqs = self._samples.pop(request_id, None)
        if seqs is None:
            seqs = [s for s in [self.requests.get(request_id), *self._failed] if s is not None
                    and s.request_id == request_id]
        for seq in seqs:
            self._request_of.pop(seq.request_id, None)
            if self.requests.pop(seq.request_id, None) is not None:
                self.scheduler.finish(seq, "abort")
        self._failed = [s for s in self._failed if s not in seqs]

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes (vLLM's name); False, changing nothing, while requests hold blocks."""
        return self.pool.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._failed)

    # --- one step ------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return an output for every request that gained a token or ended.

        Ctrl-C during a step is held until the step is complete (`deferred_interrupt`), so an interrupted
        caller finds the engine consistent and can abort its requests."""
        with deferred_interrupt():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        changed = [(seq, []) for seq in self._failed]
        self._failed.clear()
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            if self.scheduler.has_unfinished():
                raise RuntimeError(f"{type(self.scheduler).__name__} scheduled nothing while requests wait: with the "
                                   "default scheduler this means the KV pool cannot hold the oldest request; a "
                                   "policy that holds requests back should not call step() until it has work")
            return self._outputs(changed)
        threads, work = self.cpu_threads, 0.0
        if self.thread_tuner is not None:
            work = step_work([(n, seq.num_computed_tokens + n) for seq, n in plan.scheduled], self.model.config)
            threads = self.thread_tuner.threads_for_step(work)
        with borrowed_threads(threads):   # the step borrows torch's thread count and gives it back
            run_start = time.perf_counter()
            try:
                result, failure = self.runner.execute(plan.scheduled), None
            except Exception as exc:  # noqa: BLE001 - the batch failed as a whole: its requests fail, the engine lives
                result, failure = None, f"the model step failed: {type(exc).__name__}: {exc}"
            if self.thread_tuner is not None and result is not None:
                self.thread_tuner.record(threads, time.perf_counter() - run_start, work, len(self.trace))
            now = time.perf_counter()
            finished, spec = [], {}
            for seq, n in plan.scheduled:
                tokens, drafted = [], seq.num_draft_tokens
                reason = failure or (result.errors.get(seq) if result is not None else None)
                try:
                    if reason is None:
                        tokens = self._advance(seq, n, result, now)
                except Exception as exc:  # noqa: BLE001 - whatever it was, it ends this request only
                    reason = f"{type(exc).__name__}: {exc}"
                if reason is not None:
                    self._fail(seq, reason)
                elif drafted and seq in result.sampled:
                    spec[seq.request_id] = (drafted, len(result.sampled[seq]) - 1)
                    self.spec_stats.record(*spec[seq.request_id])
                if seq.is_finished:
                    finished.append(seq.request_id)
                if tokens or seq.is_finished:
                    changed.append((seq, tokens))
            draft_start = time.perf_counter()
            if self.proposer is not None:
                self._propose()
            draft_seconds = time.perf_counter() - draft_start
        self.trace.append(StepRecord(
            step=len(self.trace), start=start - self.start_time, duration=time.perf_counter() - start,
            scheduled={seq.request_id: n for seq, n in plan.scheduled}, prefix_hits=plan.prefix_hits,
            preempted=[seq.request_id for seq in plan.preempted], finished=finished,
            num_used_blocks=self.pool.num_used_blocks, num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running), threads=threads, spec=spec, draft_seconds=draft_seconds))
        return self._outputs(changed)

    def _advance(self, seq: Sequence, n: int, result, now: float) -> list[int]:
        """Count the tokens a request computed and append what it sampled: one token, or after a draft the
        accepted drafts and one more, checking after each whether the request stops."""
        tokens = result.sampled.get(seq)
        accepted = tokens[:-1] if tokens else []
        if seq.draft is not None:   # rejected drafts were computed but are not the request's: roll them back
            n -= seq.num_draft_tokens - len(accepted)
            seq.draft = None
        seq.num_computed_tokens += n
        known = seq.token_ids + accepted if accepted else seq.token_ids   # the accepted drafts were computed too
        self.pool.cache_full_blocks(seq.block_table, known, seq.num_computed_tokens, seq.block_hashes)
        if seq in result.prompt_logits:
            self._add_prompt_logprobs(seq, *result.prompt_logits[seq])
        if tokens is None:  # a chunk of a prompt: nothing to sample yet
            return []
        if seq.first_token_time is None:
            seq.first_token_time = now
        for i, token in enumerate(tokens):
            seq.token_ids.append(token)
            if seq.logprobs is not None:
                seq.logprobs.append(self._with_text(seq, result.logprobs[seq][i]))
            self._check_stop(seq, token)
            if seq.is_finished:
                return tokens[:i + 1]
        return tokens

    def _propose(self) -> None:
        """Draft tokens for the running requests that will decode next step. Drafts are only a guess: if the
        proposer fails, the requests simply decode one token at a time."""
        ready = [seq for seq in self.scheduler.running if seq.num_computed_tokens == seq.num_tokens - 1]
        try:
            for seq, draft in self.proposer.propose(ready).items():
                seq.draft = draft
        except Exception:  # noqa: BLE001
            for seq in ready:
                seq.draft = None

    def _fail(self, seq: Sequence, reason: str) -> None:
        if not seq.is_finished:
            seq.error = reason
            self._finish(seq, "error")

    def _with_text(self, seq: Sequence, entries: dict[int, Logprob]) -> dict[int, Logprob]:
        """Fill each logprob entry's `decoded_token`, as vLLM does, when the request wants text."""
        if self.tokenizer is not None and seq.params.detokenize:
            for entry, text in zip(entries.values(), self.tokenizer.batch_decode([[i] for i in entries]), strict=True):
                entry.decoded_token = text
        return entries

    def _add_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        # Row j predicts the token at position start + j + 1; keep those still inside the prompt and not yet
        # recorded (a request preempted mid-prompt computes some positions twice).
        for j in range(logits.shape[0]):
            position = start + j + 1
            if position >= seq.num_prompt_tokens:
                break
            if position == len(seq.prompt_logprobs):
                seq.prompt_logprobs.append(self._with_text(
                    seq, top_logprobs(logits[j], seq.prompt_token_ids[position], seq.params.prompt_logprobs)))

    def _check_stop(self, seq: Sequence, token: int) -> None:
        """The same rules, in the same order, as Part I's `generate`."""
        params, output = seq.params, seq.output_token_ids
        if token in seq.stop_ids:  # the stop token's text is left out unless asked for, as in vLLM
            seq.text = self._detokenize(seq, output if params.include_stop_str_in_output else output[:-1])
            self._finish(seq, "stop", token if token in params.stop_token_ids else None)
            return
        if params.stop and len(output) >= params.min_tokens:
            text, found = find_stop(self.tokenizer.decode(output), params.stop, params.include_stop_str_in_output)
            if found is not None:
                seq.text = text
                self._finish(seq, "stop", found)
                return
        if (params.max_tokens is not None and len(output) >= params.max_tokens) or seq.num_tokens >= self.max_model_len:
            seq.text = self._detokenize(seq, output)
            self._finish(seq, "length")

    def _detokenize(self, seq: Sequence, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if seq.params.detokenize and self.tokenizer is not None else ""

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        del self.requests[seq.request_id]

    def _outputs(self, changed: list[tuple[Sequence, list[int]]]) -> list[RequestOutput]:
        """One output per request that changed this step; the n sequences of a request are reported together."""
        groups: dict[str, tuple[list[Sequence], list[int]]] = {}
        for seq, tokens in changed:
            request_id = self._request_of.get(seq.request_id, seq.request_id)
            if request_id not in groups:
                groups[request_id] = (self._samples.get(request_id, [seq]), [])
            groups[request_id][1].extend(tokens)
        outputs = []
        for request_id, (seqs, tokens) in groups.items():
            outputs.append(self._output(request_id, seqs, tokens))
            if outputs[-1].finished and request_id in self._samples:
                for seq in self._samples.pop(request_id):
                    del self._request_of[seq.request_id]
        return outputs

    def _output(self, request_id: str, seqs: list[Sequence], new_token_ids: list[int]) -> RequestOutput:
        completions = []
        for index, seq in enumerate(seqs):
            cumulative = (sum(step[t].logprob for step, t in zip(seq.logprobs, seq.output_token_ids, strict=True))
                          if seq.logprobs is not None else None)
            completions.append(CompletionOutput(index, seq.text, seq.output_token_ids, cumulative, seq.logprobs,
                                                seq.finish_reason, seq.stop_reason))
        first, finished = seqs[0], all(seq.is_finished for seq in seqs)

        def earliest(times: list[float | None]) -> float | None:
            return min((t for t in times if t is not None), default=None)

        metrics = RequestMetrics(first.arrival_time, earliest([s.first_scheduled_time for s in seqs]),
                                 earliest([s.first_token_time for s in seqs]),
                                 max(s.finished_time for s in seqs) if finished else None)
        error = next((seq.error for seq in seqs if seq.error is not None), None)
        return RequestOutput(request_id, first.prompt, first.prompt_token_ids, first.prompt_logprobs, completions,
                             finished, new_token_ids, first.num_cached_tokens, metrics, error)
