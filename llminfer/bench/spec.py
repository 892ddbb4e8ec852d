"""Speculative decoding, measured: the speedup over plain decoding at each batch size and k, for each proposer,
beside what the classic formula predicts from the measured acceptance and draft cost.

Two workloads from the held-out split of tiny Shakespeare, greedy, every request `output_len` tokens:
- `grounded`: the prompt holds a passage and then starts it again, so the continuation is in the prompt (as
  when summarising, quoting or editing a document). N-gram lookup finds it; so may the model.
- `open`: the prompt is the start of a passage and the continuation is new text.

The classic formula (Leviathan et al. 2023): with each drafted token accepted with probability alpha
independently, a verification yields E = (1 - alpha^(k+1)) / (1 - alpha) tokens, and costs one target step
plus k draft steps, c each in units of a target step: speedup = E / (1 + k c). It assumes the target step
costs the same with k + 1 tokens per request as with one, which holds while decoding is bound by fixed costs
or memory traffic, and fails once the batch makes the step compute-bound.
"""

from __future__ import annotations

import copy
import random
import statistics
import time

from llminfer.datasets import tinyshakespeare_text, train_val_split
from llminfer.sampling import SamplingParams

WORKLOADS = ("grounded", "open")
PROPOSERS = ("ngram", "draft_model")
MAX_BATCH = 1024


def workload_prompts(tokenizer, workload: str, count: int, seed: int, passage_tokens: int = 160,
                     restart_tokens: int = 24) -> list[list[int]]:
    """`count` prompts (token ids) of the workload, from passages of the held-out text."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    text = train_val_split(tinyshakespeare_text())[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    newline = tokenizer.encode("\n\n", add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        start = rng.randrange(0, len(ids) - passage_tokens)
        passage = ids[start:start + passage_tokens]
        prompts.append(passage + newline + passage[:restart_tokens] if workload == "grounded"
                       else passage[:restart_tokens + 40])
    return prompts


def alpha(stats) -> float | None:
    """The per-token acceptance probability: drafts kept over drafts checked (a token is checked only when
    all before it were kept), the maximum-likelihood estimate of the formula's alpha."""
    checked = sum(stats.reached_at)
    return sum(stats.accepted_at) / checked if checked else None


def expected_tokens(a: float, k: float) -> float:
    """Tokens per verification of k drafts each kept with probability a: 1 + a + ... + a^k."""
    return k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def timed_generate(llm, prompts: list[list[int]], output_len: int) -> dict:
    """One run of the engine on the prompts: seconds, tokens, steps and where the steps' time went."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    engine = llm.llm_engine
    llm.reset_prefix_cache()
    first = len(engine.trace)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    steps = engine.trace[first:]
    # Decode steps: no request computes more than 1 + k <= 17 tokens (every prompt here is longer).
    decode = [r for r in steps if all(n <= 17 for n in r.scheduled.values())]
    return {"seconds": seconds, "tokens": [o.outputs[0].token_ids for o in outputs], "steps": len(steps),
            "decode_step_seconds": statistics.median(r.duration - r.draft_seconds for r in decode) if decode else None,
            "draft_seconds_per_step": statistics.median(r.draft_seconds for r in decode) if decode else None,
            # for the decomposition of the speedup: request-steps (one request decoding in one step, also in a step
            # that prefills others, as verifications are counted) and the time of the steps that only decode
            "decode_request_steps": sum(n <= 17 for r in steps for n in r.scheduled.values()),
            "decode_steps": len(decode),
            "decode_seconds": sum(r.duration for r in decode)}


def run(model: str = "tiny-shakespeare", draft_model: str = "tiny-shakespeare-draft",
        batch_sizes: tuple[int, ...] = (1, 4, 16, 64), ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8),
        ks_batched: tuple[int, ...] = (1, 2, 4, 8), workloads: tuple[str, ...] = WORKLOADS,
        proposers: tuple[str, ...] = ("ngram", "draft_model"), output_len: int = 128, repeats: int = 3,
        seed: int = 0, prompt_lookup: tuple[int, int] = (2, 4), log=print) -> dict:
    """Every (workload, batch size, proposer, k) against plain decoding of the same requests, alternating
    `repeats` times (medians kept). Greedy outputs must agree with plain decoding, token for token."""
    from llminfer import LLM

    check_arguments(batch_sizes, ks, ks_batched, workloads, proposers, output_len, repeats)
    base = LLM(model, max_num_seqs=max(batch_sizes), seed=seed)
    tokenizer = base.get_tokenizer()
    speculative = {}

    def engine(proposer: str, k: int):
        if (proposer, k) not in speculative:
            config = ({"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": prompt_lookup[0],
                       "prompt_lookup_max": prompt_lookup[1]} if proposer == "ngram"
                      else {"model": draft_model, "num_speculative_tokens": k})
            speculative[proposer, k] = LLM(model, max_num_seqs=max(batch_sizes), seed=seed, speculative_config=config)
        return speculative[proposer, k]

    rows = []
    for workload in workloads:
        for batch in batch_sizes:
            prompts = workload_prompts(tokenizer, workload, batch, seed)
            timed_generate(base, prompts[:1], 4)                     # warm-up
            for proposer in proposers:
                for k in ks if batch == 1 else ks_batched:
                    llm = engine(proposer, k)
                    timed_generate(llm, prompts[:1], 4)
                    base_runs, spec_runs = [], []
                    stats_before = copy.deepcopy(llm.llm_engine.spec_stats)
                    for _ in range(repeats):
                        base_runs.append(timed_generate(base, prompts, output_len))
                        spec_runs.append(timed_generate(llm, prompts, output_len))
                    stats = _diff_stats(llm.llm_engine.spec_stats, stats_before)
                    rows.append(_row(workload, batch, proposer, k, base_runs, spec_runs, stats, output_len))
                    log(_describe(rows[-1]))
    return {"model": model, "draft_model": draft_model, "output_len": output_len, "repeats": repeats, "seed": seed,
            "prompt_lookup_min": prompt_lookup[0], "prompt_lookup_max": prompt_lookup[1], "rows": rows}


def check_arguments(batch_sizes, ks, ks_batched, workloads, proposers, output_len, repeats) -> None:
    """Refuse, before anything is loaded, what the sweep cannot run, naming the value."""
    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    for name, values in (("batch_sizes", batch_sizes), ("ks", ks), ("ks_batched", ks_batched)):
        if not isinstance(values, (tuple, list)) or not values or not all(positive(v) for v in values):
            raise ValueError(f"{name} must be a non-empty list of positive ints, got {values!r:.80}")
    if max(batch_sizes) > MAX_BATCH:
        raise ValueError(f"batch sizes above {MAX_BATCH} are not measured here, got {max(batch_sizes)}")
    for name, values, known in (("workloads", workloads, WORKLOADS), ("proposers", proposers, PROPOSERS)):
        unknown = [v for v in values if v not in known] if isinstance(values, (tuple, list)) else [values]
        if unknown or not values:
            raise ValueError(f"{name} must be among {', '.join(known)}, got {values!r:.80}")
    for name, value in (("output_len", output_len), ("repeats", repeats)):
        if not positive(value):
            raise ValueError(f"{name} must be a positive int, got {value!r:.80}")


def _diff_stats(after, before):
    """The acceptance counted between two snapshots of an engine's stats."""
    from llminfer.spec.metrics import SpecStats

    pad = len(after.reached_at) - len(before.reached_at)
    reached = [a - b for a, b in zip(after.reached_at, before.reached_at + [0] * pad, strict=True)]
    accepted = [a - b for a, b in zip(after.accepted_at, before.accepted_at + [0] * pad, strict=True)]
    return SpecStats(after.num_verifications - before.num_verifications, after.num_drafted - before.num_drafted,
                     after.num_accepted - before.num_accepted, reached, accepted)


def _row(workload, batch, proposer, k, base_runs, spec_runs, stats, output_len) -> dict:
    base_s = statistics.median(r["seconds"] for r in base_runs)
    spec_s = statistics.median(r["seconds"] for r in spec_runs)
    identical = sum(a == b for a, b in zip(base_runs[0]["tokens"], spec_runs[0]["tokens"], strict=True))
    a = alpha(stats)
    drafted = stats.num_drafted / stats.num_verifications if stats.num_verifications else 0.0
    base_step = statistics.median(r["decode_step_seconds"] for r in base_runs)
    draft_step = statistics.median(r["draft_seconds_per_step"] for r in spec_runs)
    verify_step = statistics.median(r["decode_step_seconds"] for r in spec_runs)
    c = draft_step / max(drafted, 1e-9) / base_step if drafted else 0.0   # one draft token, in target steps
    predicted = None if a is None else expected_tokens(a, drafted) / (1 + drafted * c)
    # The measured speedup, decomposed: tokens per request-step (the formula's E, but only a share `coverage` of
    # request-steps had a draft to verify) over the cost of a step relative to a plain one (drafting included).
    base_rs, spec_rs = base_runs[0]["decode_request_steps"], spec_runs[0]["decode_request_steps"]
    coverage = stats.num_verifications / (len(spec_runs) * spec_rs) if spec_rs else 0.0
    step_cost = (statistics.median(r["decode_seconds"] / r["decode_steps"] for r in spec_runs)
                 / statistics.median(r["decode_seconds"] / r["decode_steps"] for r in base_runs))
    tokens_per_step = None if a is None else coverage * expected_tokens(a, drafted) + 1 - coverage
    return {
        "workload": workload, "batch_size": batch, "proposer": proposer, "k": k,
        "base_seconds": base_s, "spec_seconds": spec_s, "speedup": base_s / spec_s,
        "base_seconds_each_run": [r["seconds"] for r in base_runs],
        "spec_seconds_each_run": [r["seconds"] for r in spec_runs],
        "tokens_per_s": {"base": batch * output_len / base_s, "spec": batch * output_len / spec_s},
        "identical_requests": identical, "requests": batch,
        "alpha": a, "mean_drafted": drafted, "mean_accepted_length": stats.mean_accepted_length,
        "acceptance_by_position": stats.acceptance_by_position(),
        "steps": {"base": base_runs[0]["steps"], "spec": spec_runs[0]["steps"]},
        "cost": {"base_step_s": base_step, "verify_step_s": verify_step, "draft_s_per_step": draft_step,
                 "c_draft_token_per_target_step": c, "verify_over_base_step": verify_step / base_step},
        "predicted_speedup": predicted,
        "coverage": coverage,   # share of request-steps that had a draft to verify
        "tokens_per_request_step": {"base": base_rs and batch * output_len / base_rs,
                                    "spec": spec_rs and batch * output_len / spec_rs,
                                    "formula_with_coverage": tokens_per_step},
        "step_cost_over_base": step_cost,   # mean decode step with speculation (drafting included) / plain one
        # E with the measured coverage, over the measured step cost: what is left is the independence assumption
        "predicted_speedup_with_measured_costs": None if a is None else tokens_per_step / step_cost,
        # The classic formula's E, with the verification's measured cost instead of its assumed one.
        "predicted_speedup_with_measured_verify": None if a is None else
        expected_tokens(a, drafted) * base_step / (verify_step + draft_step),
    }


def _describe(row: dict) -> str:
    predicted = "-" if row["predicted_speedup"] is None else f"{row['predicted_speedup']:.2f}x"
    measured = ("-" if row["predicted_speedup_with_measured_costs"] is None
                else f"{row['predicted_speedup_with_measured_costs']:.2f}x")
    a = "-" if row["alpha"] is None else f"{row['alpha']:.2f}"
    return (f"{row['workload']:8} batch {row['batch_size']:>3} {row['proposer']:11} k={row['k']}: "
            f"{row['speedup']:.2f}x measured, {predicted} predicted (alpha {a}, c "
            f"{row['cost']['c_draft_token_per_target_step']:.2f}, coverage {row['coverage']:.2f}, step cost "
            f"{row['step_cost_over_base']:.2f}, with these {measured}); identical {row['identical_requests']}/"
            f"{row['requests']}")
