"""Careless and hostile callers: no request can break the engine, one request's failure is its own,
nothing is left behind by an exception, a Ctrl-C or concurrent callers, and vLLM's meanings hold."""

import os
import signal
import threading
from collections import Counter

import pytest
import torch

import llminfer
from llminfer import LLM, SamplingParams
from llminfer.engine import model_runner
from llminfer.engine.threads import MAX_INTERVAL, ThreadTuner, candidate_threads, step_work
from llminfer.sampling import sample_next_token

GREEDY = SamplingParams(temperature=0, max_tokens=12)
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nBefore we proceed", "KING"]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-shakespeare", num_kv_blocks=64, max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="module")
def reference(llm):
    """Each prompt's greedy tokens, from a clean run."""
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def assert_clean(llm):
    """Nothing left in the engine: no request, no queued failure, no block in use."""
    engine = llm.llm_engine
    assert not engine.requests and not engine._failed and not engine._samples and not engine._request_of
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.pool.num_used_blocks == 0
    assert not llm._owned and not llm._done


def assert_unharmed(llm, reference):
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert_clean(llm)


# --- values that used to break a step, and every step after it ---------------------------------------------

def test_stop_token_outside_the_vocabulary_is_refused_at_submission(llm, reference):
    with pytest.raises(ValueError, match=r"prompts\[0\]: stop_token_ids \[1000000\] are outside the vocabulary"):
        llm.generate(["ROMEO:"], SamplingParams(stop_token_ids=[10**6], min_tokens=3), use_tqdm=False)
    assert_unharmed(llm, reference)


def test_a_tiny_temperature_is_raised_to_vllms_minimum_and_never_gives_nan(llm, reference):
    tiny = llm.generate(PROMPTS, SamplingParams(temperature=1e-40, seed=3, max_tokens=12), use_tqdm=False)
    floor = llm.generate(PROMPTS, SamplingParams(temperature=1e-2, seed=3, max_tokens=12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in tiny] == [o.outputs[0].token_ids for o in floor]
    assert all(o.outputs[0].finish_reason in ("length", "stop") for o in tiny)
    assert_unharmed(llm, reference)


def test_a_huge_repetition_penalty_samples_the_limit_distribution():
    # logits 5 and 3 are "seen" and divided by 1e-40: both overflow to +inf. The limit of the distribution as
    # the penalty shrinks is uniform over those two, and the unseen token never comes up.
    logits = torch.tensor([5.0, 3.0, -1.0])
    params = SamplingParams(repetition_penalty=1e-40, temperature=1.0)
    from llminfer.sampling import apply_penalties
    penalised = apply_penalties(logits, [0, 1], [], params)
    assert torch.isinf(penalised[:2]).all()
    generator = torch.Generator().manual_seed(0)
    draws = Counter(int(sample_next_token(penalised, params, generator)) for _ in range(2000))
    assert draws[2] == 0 and abs(draws[0] - 1000) < 4 * (2000 * 0.25) ** 0.5  # binomial(2000, 1/2), 4 sigma


def test_a_huge_repetition_penalty_in_the_engine_finishes(llm, reference):
    out = llm.generate(PROMPTS, SamplingParams(repetition_penalty=1e-40, seed=0, max_tokens=12), use_tqdm=False)
    assert all(o.outputs[0].finish_reason in ("length", "stop") and o.error is None for o in out)
    assert_unharmed(llm, reference)


def test_min_tokens_that_forbid_every_token_fail_that_request_only(llm, reference):
    vocab = llm.model.config.vocab_size
    everything = SamplingParams(stop_token_ids=list(range(vocab)), min_tokens=2, max_tokens=4, temperature=0.8)
    outputs = llm.generate(PROMPTS[:2], [everything, GREEDY], use_tqdm=False)
    assert outputs[0].outputs[0].finish_reason == "error" and "every token is excluded" in outputs[0].error
    assert outputs[1].outputs[0].token_ids == reference[1] and outputs[1].error is None
    assert_unharmed(llm, reference)


def test_params_changed_after_construction_are_checked_again_at_submission(llm, reference):
    params = SamplingParams(temperature=0.5)
    params.temperature = float("nan")
    with pytest.raises(ValueError, match="temperature must be a finite number, got nan"):
        llm.generate("ROMEO:", params, use_tqdm=False)
    params = SamplingParams(n=2, seed=5)
    params.seed = 2**64 - 1
    with pytest.raises(ValueError, match=r"seed must be None, -1 or in \[0, 2\*\*64 - n\] \(here n=2\)"):
        llm.generate("ROMEO:", params, use_tqdm=False)
    assert_unharmed(llm, reference)


def test_the_engine_keeps_its_own_copy_of_the_params(llm, reference):
    params = SamplingParams(temperature=0, max_tokens=12)
    engine = llm.llm_engine
    request_id = engine.add_request(None, "ROMEO:", params)
    params.max_tokens, params.temperature = 1, 5.0   # the caller changes its object while the request runs
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = [o for o in outputs if o.request_id == request_id and o.finished][0]
    assert final.outputs[0].token_ids == reference[0]
    assert_clean(llm)


# --- one request's failure is its own -------------------------------------------------------------------------

def test_a_request_whose_sampling_raises_fails_alone(llm, reference, monkeypatch):
    real = model_runner.next_token

    def poisoned(logits, params, *args):
        if params.seed == 666:
            raise RuntimeError("poisoned sampler")
        return real(logits, params, *args)

    monkeypatch.setattr(model_runner, "next_token", poisoned)
    bad = SamplingParams(temperature=0.7, seed=666, max_tokens=12)
    outputs = llm.generate(PROMPTS + ["ROMEO:"], [GREEDY] * 4 + [bad], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[:4]] == reference
    assert outputs[4].outputs[0].finish_reason == "error"
    assert outputs[4].error == "sampling failed: RuntimeError: poisoned sampler"
    monkeypatch.undo()
    assert_unharmed(llm, reference)


def test_a_request_whose_text_cannot_be_decoded_fails_alone(llm, reference, monkeypatch):
    engine = llm.llm_engine
    real = engine._detokenize

    def broken(seq, token_ids):
        if seq.params.max_tokens == 7:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(seq, token_ids)

    monkeypatch.setattr(engine, "_detokenize", broken)
    outputs = llm.generate(PROMPTS + ["ROMEO:"], [GREEDY] * 4 + [SamplingParams(temperature=0, max_tokens=7)],
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[:4]] == reference
    assert outputs[4].outputs[0].finish_reason == "error" and "UnicodeDecodeError" in outputs[4].error
    monkeypatch.undo()
    assert_unharmed(llm, reference)


def test_a_step_that_fails_as_a_whole_fails_its_requests_and_the_engine_goes_on(llm, reference, monkeypatch):
    runner = llm.llm_engine.runner
    real, calls = runner.execute, []

    def fails_once(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise MemoryError("out of memory in the model")
        return real(batch)

    monkeypatch.setattr(runner, "execute", fails_once)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "error" for o in outputs)
    assert all(o.error == "the model step failed: MemoryError: out of memory in the model" for o in outputs)
    monkeypatch.undo()
    assert_unharmed(llm, reference)


# --- all or nothing: exceptions, interrupts, threads -----------------------------------------------------------

@pytest.mark.parametrize("prompt, params, match", [
    ("\ud800", GREEDY, r"prompts\[1\]: prompt is not valid Unicode text: surrogates not allowed at index 0"),
    ("x", "not params", r"sampling_params\[1\] must be a SamplingParams, got str"),
    ({"prompt_token_ids": [1, True]}, GREEDY, r"prompts\[1\]: prompt_token_ids must be a list of ints"),
    (None, GREEDY, r"prompts\[1\]: a prompt is a str or a dict"),
])
def test_a_bad_second_prompt_submits_nothing(llm, reference, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["ROMEO:", prompt], [GREEDY, params], use_tqdm=False)
    assert_unharmed(llm, reference)


def test_any_exception_during_submission_aborts_what_was_submitted(llm, reference, monkeypatch):
    engine, real = llm.llm_engine, llm.llm_engine.add_request

    def second_raises(request_id, prompt, params=None):
        if prompt == "boom":
            raise TypeError("not a ValueError")
        return real(request_id, prompt, params)

    monkeypatch.setattr(engine, "add_request", second_raises)
    with pytest.raises(TypeError, match="not a ValueError"):
        llm.generate(["ROMEO:", "boom"], GREEDY, use_tqdm=False)
    monkeypatch.undo()
    assert_clean(llm)
    steps = len(engine.trace)
    assert_unharmed(llm, reference)
    assert all("ROMEO" not in str(r.scheduled) for r in engine.trace[steps:])  # nothing stale ran later


def test_a_keyboard_interrupt_from_the_progress_bar_aborts_the_call(llm, reference):
    class Bar:
        def __init__(self, **kwargs):
            self.count = 0

        def update(self, n):
            raise KeyboardInterrupt

        def close(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, [GREEDY, GREEDY, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                               GREEDY], use_tqdm=Bar)
    assert_clean(llm)
    assert_unharmed(llm, reference)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs POSIX signals")
def test_ctrl_c_during_generate_aborts_its_requests_at_a_step_boundary(llm, reference):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(PROMPTS * 2, long, use_tqdm=False)
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert_clean(llm)
    assert_unharmed(llm, reference)


def test_generate_from_several_threads_gives_each_its_own_outputs(llm, reference):
    seeded = SamplingParams(temperature=0.9, seed=11, max_tokens=12)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, seeded, use_tqdm=False)]
    results, errors = {}, []

    def call(i):
        try:
            params = GREEDY if i % 2 == 0 else seeded
            order = PROMPTS[i % 4:] + PROMPTS[:i % 4]
            outputs = llm.generate(order, params, use_tqdm=False)
            results[i] = (order, params, [o.outputs[0].token_ids for o in outputs], [o.prompt for o in outputs])
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 6
    for order, params, tokens, prompts in results.values():
        expected = dict(zip(PROMPTS, reference if params is GREEDY else alone))
        assert prompts == order and tokens == [expected[p] for p in order]
    assert_clean(llm)


def test_every_step_gives_back_the_callers_thread_count(llm):
    before = torch.get_num_threads()
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            llm.generate("ROMEO:", GREEDY, use_tqdm=False)
            assert torch.get_num_threads() == caller
            engine = llm.llm_engine
            engine.add_request(None, "JULIET:", GREEDY)
            while engine.has_unfinished_requests():
                engine.step()
                assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(before)


# --- vLLM's meanings and arguments ----------------------------------------------------------------------------

def test_max_tokens_none_runs_to_the_context():
    small = LLM("tiny-shakespeare", max_model_len=40, num_kv_blocks=8)
    out = small.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40
    assert out.outputs[0].finish_reason == "length"


def test_logprobs_minus_one_is_the_whole_vocabulary_with_text(llm):
    tokenizer = llm.get_tokenizer()
    out = llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=2, logprobs=-1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    step = out.outputs[0].logprobs[0]
    assert len(step) == llm.model.config.vocab_size
    values = torch.tensor([entry.logprob for entry in step.values()])
    # a token's rank is 1 + the number of strictly more likely tokens (equal logprobs share a rank)
    assert [entry.rank for entry in step.values()] == [1 + int((values > entry.logprob).sum())
                                                       for entry in step.values()]
    assert min(entry.rank for entry in step.values()) == 1
    assert all(entry.decoded_token == tokenizer.decode([i]) for i, entry in step.items())
    assert all(e.decoded_token == tokenizer.decode([i]) for row in out.prompt_logprobs[1:] for i, e in row.items())


def test_seed_minus_one_means_unseeded_and_llm_seed_none_is_random():
    assert SamplingParams(seed=-1).seed is None
    runs = [LLM("tiny-shakespeare", seed=None, num_kv_blocks=16, max_model_len=128).generate(
        "ROMEO:", SamplingParams(temperature=1.0, max_tokens=24), use_tqdm=False)[0].outputs[0].token_ids
        for _ in range(2)]
    assert runs[0] != runs[1]   # 24 draws at temperature 1 agreeing by chance is vanishingly unlikely
    with pytest.raises(ValueError, match="seed must be None or an int in"):
        LLM("tiny-shakespeare", seed=2**64)


def test_include_stop_str_in_output_keeps_a_stop_tokens_text_as_vllm_does(llm, reference):
    tokenizer = llm.get_tokenizer()
    stop = reference[0][3]
    kept, dropped = (llm.generate("ROMEO:", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop],
                                                           include_stop_str_in_output=include), use_tqdm=False)[0]
                     for include in (True, False))
    assert kept.outputs[0].token_ids == dropped.outputs[0].token_ids == reference[0][:4]
    assert kept.outputs[0].text == tokenizer.decode(reference[0][:4])
    assert dropped.outputs[0].text == tokenizer.decode(reference[0][:3])
    part_one = llminfer.generate(llm.model, tokenizer, "ROMEO:", SamplingParams(
        temperature=0, max_tokens=12, stop_token_ids=[stop], include_stop_str_in_output=True))
    assert part_one.text == kept.outputs[0].text


def test_prompt_dicts_clone_and_from_optional():
    from llminfer import TextPrompt, TokensPrompt

    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}
    assert TextPrompt(prompt="x") == {"prompt": "x"}
    params = SamplingParams(stop=["a"], stop_token_ids=[3])
    copy = params.clone()
    copy.stop.append("b")
    copy.stop_token_ids.append(4)
    assert params.stop == ["a"] and params.stop_token_ids == [3]
    built = SamplingParams.from_optional(n=None, temperature=None, top_p=None, seed=None, max_tokens=None)
    assert built == SamplingParams(max_tokens=None)


def test_text_and_token_prompts_and_a_callable_progress_bar(llm, reference):
    from llminfer import TextPrompt, TokensPrompt

    tokenizer, seen = llm.get_tokenizer(), []

    class Bar:
        def __init__(self, total, **kwargs):
            seen.append(total)

        def update(self, n):
            seen.append(n)

        def close(self):
            seen.append("closed")

    ids = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    outputs = llm.generate([TextPrompt(prompt=PROMPTS[0]), TokensPrompt(prompt_token_ids=ids)], GREEDY, use_tqdm=Bar)
    assert [o.outputs[0].token_ids for o in outputs] == reference[:2]
    assert seen == [2, 1, 1, "closed"]


def test_skip_tokenizer_init_takes_token_ids_and_returns_no_text(llm, reference):
    bare = LLM("tiny-shakespeare", skip_tokenizer_init=True, num_kv_blocks=16, max_model_len=128)
    assert bare.get_tokenizer() is None
    ids = llm.get_tokenizer().encode(PROMPTS[0], add_special_tokens=False)
    out = bare.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=12, logprobs=2),
                        use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference[0] and out.outputs[0].text == ""
    assert all(e.decoded_token is None for e in out.outputs[0].logprobs[0].values())
    with pytest.raises(ValueError, match="cannot pass text prompts when the engine has no tokenizer"):
        bare.generate("ROMEO:", use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        bare.generate({"prompt_token_ids": ids}, SamplingParams(stop=["x"]), use_tqdm=False)


def test_vllm_engine_arguments_are_honoured_or_refused_with_their_meaning():
    fine = LLM("tiny-shakespeare", tensor_parallel_size=1, enforce_eager=True, trust_remote_code=True,
               tokenizer=str(llminfer.models.registry.SHIPPED["tiny-shakespeare"]), num_kv_blocks=16,
               max_model_len=128)
    assert fine.generate("ROMEO:", GREEDY, use_tqdm=False)[0].outputs[0].text
    with pytest.raises(ValueError, match="tensor_parallel_size=2 splits each layer over that many GPUs in vLLM"):
        LLM("tiny-shakespeare", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="cpu_offload_gb: in vLLM this argument keeps part of the weights in host"):
        LLM("tiny-shakespeare", cpu_offload_gb=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        LLM("tiny-shakespeare", colour="blue")
    with pytest.raises(ValueError, match="enforce_eager must be a bool, got 'yes'"):
        LLM("tiny-shakespeare", enforce_eager="yes")
    assert fine.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)[0].prompt == "ROMEO:\nhi\n\nJULIET:\n"


# --- the CPU thread policy ------------------------------------------------------------------------------------

def test_candidate_thread_counts_halve_down_to_one():
    assert candidate_threads(1) == [1] and candidate_threads(2) == [2, 1]
    assert candidate_threads(8) == [8, 4, 2, 1] and candidate_threads(6) == [6, 3, 1]
    with pytest.raises(ValueError, match="cpu threads must be a positive int, got 0"):
        ThreadTuner(0)


def simulate(tuner, cost_of, steps, start=0):
    """Run `steps` steps of equal work whose seconds per unit depend on the thread count and the step."""
    used = []
    for step in range(start, start + steps):
        threads = tuner.threads_for_step(100)
        used.append(threads)
        tuner.record(threads, cost_of(threads, step) * 100, 100, step)
    return used


def test_the_tuner_follows_the_load_both_ways():
    tuner = ThreadTuner(2)
    quiet = {2: 1e-4, 1: 1.6e-4}     # idle machine: two threads 1.6x faster
    busy = {2: 3.5e-4, 1: 1.6e-4}    # one core taken by another program: barriers wait, two threads 2.2x slower
    used = simulate(tuner, lambda t, s: quiet[t], 300)
    assert tuner.current == 2 and used.count(1) <= 12          # probes cost a few slow steps
    used = simulate(tuner, lambda t, s: busy[t], 300, start=300)
    # A step that suddenly takes longer brings the next probe forward: the switch comes within a few steps.
    assert tuner.current == 1 and tuner.switches[-1][0] < 300 + 10 and used[10:].count(1) >= 0.93 * 290
    used = simulate(tuner, lambda t, s: quiet[t], 600, start=600)
    # Nothing gets slower when the load goes away, so the switch back waits for a scheduled probe.
    assert tuner.current == 2 and tuner.switches[-1][0] < 600 + MAX_INTERVAL + 10
    assert used[MAX_INTERVAL + 10:].count(2) >= 0.93 * (600 - MAX_INTERVAL - 10)


def test_the_tuner_ignores_noise_and_short_steps():
    tuner = ThreadTuner(2)
    noisy = {2: 1e-4, 1: 1.05e-4}  # within MIN_GAIN: no reason to switch
    simulate(tuner, lambda t, s: noisy[t] * (1.3 if s % 7 == 0 else 1.0), 400)
    assert tuner.current == 2 and not tuner.switches
    tuner.record(1, 1e-5, 10, 0)   # a step too short to time changes nothing
    assert tuner.current == 2


def test_each_step_size_keeps_its_own_choice():
    """Small steps are mostly fixed per-op costs (a second thread only adds to them), large ones split well:
    on the same machine at the same time, the tuner must use 1 thread for the first and 2 for the second."""
    tuner = ThreadTuner(2)
    cost = {(2, "small"): 1.3e-3, (1, "small"): 1e-3, (2, "large"): 1e-4, (1, "large"): 1.6e-4}   # per unit
    used = {"small": [], "large": []}
    for step in range(600):
        size = "small" if step % 3 else "large"
        work = 4 if size == "small" else 2000
        threads = tuner.threads_for_step(work)
        used[size].append(threads)
        tuner.record(threads, cost[threads, size] * work, work, step)
    assert used["small"][100:].count(1) >= 0.9 * len(used["small"][100:])
    assert used["large"][100:].count(2) >= 0.9 * len(used["large"][100:])
    assert tuner.bucket(4) != tuner.bucket(2000)
    # A size never seen starts from the latest choice (the load is the machine's, not the size's) ...
    tuner.threads_for_step(4)
    assert tuner.threads_for_step(100) == 1 or tuner.choices[tuner.bucket(100)].plan
    assert tuner.choices[tuner.bucket(100)].current == 1


def test_step_work_counts_tokens_and_attention():
    config = llminfer.load_model("tiny-shakespeare")[0].config
    assert step_work([(5, 5)], config) > 5 and step_work([(1, 1000)], config) > step_work([(1, 10)], config)
    assert step_work([(3, 10), (1, 50)], config) == step_work([(3, 10)], config) + step_work([(1, 50)], config)


def test_the_engine_records_its_threads_and_any_count_gives_the_same_tokens(reference):
    tokens = {}
    for threads in (1, 2, None):
        engine_llm = LLM("tiny-shakespeare", num_kv_blocks=64, max_num_seqs=8, max_model_len=256, cpu_threads=threads)
        outputs = engine_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        tokens[threads] = [o.outputs[0].token_ids for o in outputs]
        used = {r.threads for r in engine_llm.llm_engine.trace}
        assert used <= ({threads} if threads else set(candidate_threads(torch.get_num_threads())))
    assert tokens[1] == tokens[2] == tokens[None] == reference
    with pytest.raises(ValueError, match="cpu_threads must be None or a positive int, got 0"):
        LLM("tiny-shakespeare", cpu_threads=0)
