"""What exercises hand to the student, and what the grader runs on the student's side of the wire.

Nothing here knows an answer: the exercise notebooks import these helpers (a request builder, the launchers of
the two Triton kernels, the engine harness of the batching exercise), and the grader's student process
(`llminfer.grading.student`) uses them to run what cannot cross the wire as plain data: a kernel is launched
where it was defined, a scheduling policy runs inside an engine there, and the steps it planned come back to be
replayed and judged by the scoring process. The references and tests live in `llminfer.grading.exercises`,
which a submission being graded cannot import.
"""

from __future__ import annotations

import ast
import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from llminfer.engine.scheduler import Scheduler, SchedulerOutput
from llminfer.engine.sequence import Sequence
from llminfer.grading.compare import Mismatch
from llminfer.sampling import SamplingParams

try:
    import triton
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import InterpreterError
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # Triton ships for Linux only: the kernel exercises then explain why they cannot run
    triton = None


# --- chapter 8: a request in a given state ------------------------------------------------------------------------

def make_request(request_id: str, num_tokens: int, num_computed_tokens: int = 0) -> Sequence:
    """A request of `num_tokens` tokens, `num_computed_tokens` of which are in the KV cache."""
    if not 0 <= num_computed_tokens < num_tokens:
        raise ValueError(f"need 0 <= num_computed_tokens < num_tokens, got {num_computed_tokens} of {num_tokens}")
    seq = Sequence(request_id, None, list(range(1, num_tokens + 1)), SamplingParams(temperature=0), frozenset())
    seq.num_computed_tokens = num_computed_tokens
    return seq


# --- chapters 6 and 18: launching a student's Triton kernel ------------------------------------------------------

PAGED_BLOCK_N = 16   # positions per tile of the paged decode kernel: longer contexts take several iterations
GEMV_BLOCK_N = 16    # output features per program of the int4 GEMV
GEMV_BLOCK_K = 32    # input features per step of a GEMV program's loop


def paged_decode(kernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Launch `kernel` with one program per (sequence, query head); return the output [num_seqs, num_heads, head_dim].

    q: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks] int32, padded with -1; seq_lens: [num_seqs] int32, at least 1.
    """
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    kernel[(num_seqs, num_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, out, scale,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_heads // k_cache.shape[2], BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=PAGED_BLOCK_N,
    )
    return out


def int4_gemv(kernel, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """x [tokens, in] @ W.T -> [tokens, out] in x's dtype, for W [out, in] in group-wise int4: packed uint8
    [out, in / 2], scales fp32 and zeros uint8 [out, in / group_size]. Launches `kernel` on contiguous tensors
    with one program per (token, GEMV_BLOCK_N output features)."""
    tokens, in_features = x.shape
    out_features = packed.shape[0]
    x, packed, scales, zeros = (t.contiguous() for t in (x, packed, scales, zeros))
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    kernel[(tokens, triton.cdiv(out_features, GEMV_BLOCK_N))](
        x, packed, scales, zeros, out, out_features, in_features,
        GROUP_SIZE=group_size, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K,
    )
    return out


LAUNCHERS = {"paged_decode": paged_decode, "int4_gemv": int4_gemv}


def device_for(kernel) -> torch.device:
    """Where the kernel runs: the CPU under the interpreter, else the GPU (a clear error if there is none)."""
    if triton is None:
        raise Mismatch("Triton is not installed here (it ships for Linux): this exercise needs it")
    if not isinstance(kernel, triton.runtime.KernelInterface):
        raise Mismatch(f"the answer is a {type(kernel).__name__}, not a Triton kernel: decorate it with @triton.jit")
    if isinstance(kernel, InterpretedFunction):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise Mismatch("the kernel was compiled for a GPU and there is none: set os.environ['TRITON_INTERPRET'] = "
                       "'1' before the kernel is defined (the notebook's first cell does), then define it again")
    return torch.device("cuda")


def run_kernel(kernel, launcher: str, tensors: tuple, *extra) -> torch.Tensor:
    """LAUNCHERS[launcher](kernel, *tensors moved to the kernel's device, *extra), on the CPU again, with the
    student's own error shown when it fails."""
    device = device_for(kernel)
    try:
        args = [t.to(device) for t in tensors]
    except RuntimeError as exc:  # a forked process cannot start CUDA once its parent used it
        raise Mismatch(f"CUDA cannot start in the grader's forked process ({exc}); restart the notebook and check "
                       "before anything uses the GPU, or set TRITON_INTERPRET=1 in the first cell to grade the "
                       "kernel through the interpreter on the CPU") from None
    try:
        return LAUNCHERS[launcher](kernel, *args, *extra).cpu()
    except InterpreterError as exc:  # the interpreter wraps the kernel's own exception: show that one
        raise (exc.__cause__ or exc) from None
    except CompilationError as exc:  # compiled, a stub's `raise` is a syntax Triton does not take
        if isinstance(exc.node, ast.Raise) and "NotImplementedError" in ast.unparse(exc.node):
            raise NotImplementedError from None
        raise


# --- chapter 7: a scheduling policy inside the real engine ----------------------------------------------------------

BATCHING_MODEL = "tiny-shakespeare-draft"


@dataclass(frozen=True)
class Workload:
    """Requests (prompt token ids, output length) and the engine that serves them."""

    requests: tuple[tuple[tuple[int, ...], int], ...]
    num_kv_blocks: int
    block_size: int = 8
    max_num_seqs: int = 4
    max_num_batched_tokens: int = 32
    max_model_len: int = 64

    def plain(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_plain(cls, fields: dict) -> Workload:
        requests = tuple((tuple(int(t) for t in prompt), int(n)) for prompt, n in fields["requests"])
        return cls(**{**fields, "requests": requests})


def workload_requests(seed: int, count: int, vocab: int = 2048) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Random prompts of 3 to 40 token ids (2048: the shipped models' vocabulary) and 4 to 20 output tokens."""
    rng = random.Random(seed)
    return tuple((tuple(rng.randrange(vocab) for _ in range(rng.randint(3, 40))), rng.randint(4, 20))
                 for _ in range(count))


AMPLE = Workload(workload_requests(seed=7, count=10), num_kv_blocks=64)
SCARCE = Workload(AMPLE.requests, num_kv_blocks=9)   # room for about two requests: the engine must preempt


@dataclass
class Served:
    """One run of a workload: every request's output tokens, the engine (its trace and pool), and each step's
    plan as plain data: ([(request_id, tokens), ...] in the order scheduled, [preempted request ids])."""

    outputs: dict[str, list[int]]
    engine: object
    plans: list[tuple[list[tuple[str, int]], list[str]]] = dataclasses.field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.engine.trace)


@cache
def batching_model():
    from llminfer.models.loader import load_model

    return load_model(BATCHING_MODEL, device="cpu", dtype=torch.float32)


def serve(policy: type[Scheduler], workload: Workload) -> Served:
    """Serve every request of `workload` with an engine using `policy`, on one thread (this model's tiny
    operations gain nothing from more, and lose much on a busy machine). A Mismatch says what went wrong if the
    policy deadlocks, drops a request or runs far longer than any sensible policy would."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _serve(policy, workload)
    finally:
        torch.set_num_threads(threads)


def _serve(policy: type[Scheduler], workload: Workload) -> Served:
    from llminfer.engine.llm_engine import LLMEngine

    model, tokenizer = batching_model()
    engine = LLMEngine(model, tokenizer, block_size=workload.block_size, num_kv_blocks=workload.num_kv_blocks,
                       max_num_seqs=workload.max_num_seqs, max_num_batched_tokens=workload.max_num_batched_tokens,
                       max_model_len=workload.max_model_len, enable_prefix_caching=False, scheduler_cls=policy)
    if not isinstance(engine.scheduler, Scheduler):
        raise Mismatch(f"the policy made a {type(engine.scheduler).__name__}, expected a subclass of Scheduler")
    for index, (prompt, output_len) in enumerate(workload.requests):
        engine.add_request(str(index), {"prompt_token_ids": list(prompt)},
                           SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False))
    plans: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recorded_schedule() -> SchedulerOutput:
        plans.append(schedule())
        return plans[-1]

    engine.scheduler.schedule = recorded_schedule
    # Every step computes at least one token, so a policy that needs more steps than this is stuck.
    step_cap = 2 * sum(len(prompt) + output_len for prompt, output_len in workload.requests) + 50
    outputs, step, plain = {}, 0, []
    while engine.has_unfinished_requests():
        if step == step_cap:
            where = {i: "waiting" if seq in engine.scheduler.waiting else "running"
                     if seq in engine.scheduler.running else "in no queue" for i, seq in engine.requests.items()}
            raise Mismatch(f"not done after {step_cap} engine steps (the reference scheduler needs far fewer): "
                           f"unfinished requests {where}")
        recorded, planned = len(engine.trace), len(plans)
        try:
            finished = [out for out in engine.step() if out.finished]
        except RuntimeError:
            if len(plans) == planned or plans[-1].scheduled or not engine.scheduler.has_unfinished():
                raise   # raised by the policy itself, or by something other than an empty plan
            # The engine refuses a step that schedules nothing while requests wait: say why, in the policy's terms.
            pool = engine.pool
            raise Mismatch(f"step {step}: the policy scheduled nothing while {len(engine.scheduler.waiting)} "
                           f"requests waited and {len(engine.scheduler.running)} ran, with {pool.num_free_blocks} of "
                           f"{pool.num_blocks} KV blocks free (a deadlock)") from None
        if len(engine.trace) == recorded:   # nothing ran, and the scheduler holds nothing: requests were lost
            raise Mismatch(f"step {step}: requests {sorted(engine.requests, key=int)} are neither waiting nor "
                           "running: the policy dropped them")
        plain += [([(seq.request_id, n) for seq, n in plan.scheduled], [seq.request_id for seq in plan.preempted])
                  for plan in plans[planned:]]
        outputs.update((out.request_id, out.outputs[0].token_ids) for out in finished)
        step += 1
    return Served(outputs, engine, plain)


def reference_run(workload: Workload) -> tuple[dict[str, list[int]], int]:
    """The outputs and steps of llminfer's `Scheduler` (first come, first served) on `workload`."""
    served = serve(Scheduler, workload)
    return served.outputs, served.steps


def policy_plans(policy: type[Scheduler], workload: dict) -> list:
    """The grader's harness: the plans `policy` makes serving the workload, as plain data for the wire."""
    return serve(policy, Workload.from_plain(workload)).plans


# --- what the student's process builds for the grader --------------------------------------------------------------

SERVING_MODEL = "tiny-shakespeare"   # whose tokenizer the detokenizer exercise streams through


@cache
def tokenizer(model: str):
    """A shipped model's tokenizer (byte-level BPE: one token can hold part of a character's bytes)."""
    from llminfer.models.loader import load_tokenizer
    from llminfer.models.registry import resolve_model_path

    return load_tokenizer(resolve_model_path(model))


def model_config(fields: dict):
    from llminfer.models.config import ModelConfig

    return ModelConfig(**fields)


# Objects the scoring process sends by name and arguments (wire.Recipe), rebuilt on the student's side.
RECIPES: dict[str, Callable] = {"sequence": make_request, "tokenizer": tokenizer, "model_config": model_config}
# What a student's process can load before the submission does (Exercise.warm), for every test to inherit.
WARM: dict[str, Callable] = {"tokenizer": lambda: tokenizer(SERVING_MODEL), "batching_model": batching_model}
# Code the scoring process asks the student's process to run with the student's answer as the first argument.
HARNESSES: dict[str, Callable] = {"run_kernel": run_kernel, "policy_plans": policy_plans}
