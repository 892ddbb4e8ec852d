"""The roofline counts against independent ones: torch's FLOP counter on the real forward pass, the
model's own parameters and cache tensors, and the roofline's closed form."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import llminfer.models.llama as llama
from llminfer.attention import cache_attention, write_kv
from llminfer.bench import roofline
from llminfer.kv import ContiguousKVCache
from llminfer.models.config import ModelConfig
from llminfer.models.llama import Llama

GQA = ModelConfig(architecture="LlamaForCausalLM", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                  num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=None, eos_token_ids=())
# Qwen2-like: biases on q/k/v, one KV head per query head, head_dim not hidden / heads, untied lm_head.
MHA_BIAS = dataclasses.replace(GQA, architecture="Qwen2ForCausalLM", num_heads=3, num_kv_heads=3, head_dim=24,
                               qkv_bias=True, tie_word_embeddings=False)
QK_NORM = dataclasses.replace(GQA, architecture="Qwen3ForCausalLM", num_kv_heads=1, qk_norm=True)
CONFIGS = {"gqa_tied": GQA, "mha_bias_untied": MHA_BIAS, "qk_norm": QK_NORM}


@pytest.fixture(autouse=True)
def exact_attention(monkeypatch):
    """Count the work attention must do: the per-sequence reference `cache_attention`, which scores each
    query against exactly the keys it sees. (The engine's CPU decode path trades extra arithmetic, every
    query head against every KV head of a block, for fewer memory passes; the roofline counts the need.)"""
    def reference(q, k, v, k_cache, v_cache, meta):
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return cache_attention(q, k_cache, v_cache, meta)

    monkeypatch.setattr(llama, "paged_attention", reference)


def build(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Llama:
    return Llama(config).to(dtype).eval()


def counted_flops(model: Llama, cache: ContiguousKVCache, num_new_tokens: list[int]) -> int:
    """FLOPs torch's counter sees in one cached forward pass (it counts matmuls and attention, 2 per multiply-add)."""
    ids = torch.randint(0, model.config.vocab_size, (sum(num_new_tokens),))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(ids, cache, cache.append(num_new_tokens))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("context_len, batch_size", [(0, 1), (9, 3), (30, 2)])
def test_decode_flops_match_the_flop_counter(name, context_len, batch_size):
    config = CONFIGS[name]
    model = build(config)
    cache = ContiguousKVCache(config, batch_size, context_len + 1)
    cache.lengths = [context_len] * batch_size
    # One query attends to every cached key, so the counted work is exactly the causal work.
    assert counted_flops(model, cache, [1] * batch_size) == roofline.forward_flops(config, 1, context_len, batch_size)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("num_new_tokens, context_len", [(7, 0), (1, 0), (5, 11)])
def test_prefill_flops_equal_the_same_tokens_fed_one_by_one(name, num_new_tokens, context_len):
    """Causal attention does the same work whether tokens arrive together or one per step; the counter
    counts the reference's masked square for a multi-token pass, so count it step by step."""
    config = CONFIGS[name]
    model = build(config)
    cache = ContiguousKVCache(config, 1, context_len + num_new_tokens)
    cache.lengths = [context_len]
    one_by_one = sum(counted_flops(model, cache, [1]) for _ in range(num_new_tokens))
    assert roofline.forward_flops(config, num_new_tokens, context_len) == one_by_one


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_count_matches_the_model(name):
    config = CONFIGS[name]
    assert roofline.parameter_count(config) == sum(p.numel() for p in build(config).parameters())


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_reads_every_weight_once(name, dtype):
    config = CONFIGS[name]
    model = build(config, dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not config.tie_word_embeddings:   # only the new token's row of the embedding table is read
        weight_bytes -= (config.vocab_size - 1) * config.hidden_size * dtype_bytes
    new_kv = ContiguousKVCache(config, 1, 1, dtype=dtype).nbytes
    assert roofline.forward_bytes(config, 1, 0, dtype_bytes) == weight_bytes + new_kv


@pytest.mark.parametrize("batch_size", [1, 4])
def test_each_sequence_reads_its_cache_and_shares_the_weights(batch_size):
    context_len, dtype_bytes = 20, 2
    cached = ContiguousKVCache(GQA, batch_size, context_len, dtype=torch.bfloat16).nbytes
    added = roofline.forward_bytes(GQA, 1, context_len, dtype_bytes, batch_size) - roofline.forward_bytes(
        GQA, 1, 0, dtype_bytes, batch_size)
    assert added == cached
    weights_and_one_step = roofline.forward_bytes(GQA, 1, 0, dtype_bytes, batch_size)
    new_kv = ContiguousKVCache(GQA, batch_size, 1, dtype=torch.bfloat16).nbytes
    assert weights_and_one_step == roofline.parameter_count(GQA) * dtype_bytes + new_kv


def test_decode_intensity_grows_with_batch_and_prefill_with_length():
    decode = [roofline.arithmetic_intensity(GQA, 1, 16, 2, b) for b in (1, 2, 8)]
    prefill = [roofline.arithmetic_intensity(GQA, n, 0, 2) for n in (1, 16, 64)]
    assert decode == sorted(decode) and prefill == sorted(prefill) and decode[0] == pytest.approx(prefill[0], rel=0.1)


@pytest.mark.parametrize("intensity", [0.01, 0.5, 4.0, 10.0, 1e3])
def test_attainable_is_the_lower_of_the_two_roofs(intensity):
    peak, bandwidth = 100e9, 25e9   # ridge at 4 FLOP/byte
    expected = intensity * bandwidth if intensity < peak / bandwidth else peak
    assert roofline.attainable(intensity, peak, bandwidth) == pytest.approx(expected)


def test_timed_calls_warmup_plus_repeats_times():
    calls = []
    seconds = roofline.timed(lambda: calls.append(1), "cpu", repeats=4, warmup=2)
    assert len(calls) == 6 and len(seconds) == 4 and all(s >= 0 for s in seconds)


def test_measured_cpu_ceilings_are_in_a_plausible_range():
    # Catches unit slips (ms for s, elements for bytes), which are off by 1e3 or more.
    assert 1e8 < roofline.measure_matmul_flops("cpu", torch.float32, n=256, repeats=3) < 1e14
    assert 1e8 < roofline.measure_copy_bandwidth("cpu", nbytes=2**22, repeats=3) < 1e13


def test_time_forward_runs_the_pass_forward_flops_counts():
    model = build(GQA)
    counter = FlopCounterMode(display=False)
    with counter:
        seconds = roofline.time_forward(model, 1, 10, batch_size=2, repeats=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert counter.get_total_flops() == 3 * roofline.forward_flops(GQA, 1, 10, batch_size=2)   # warm-up + 2


def test_measure_points_reports_counted_work_over_measured_time():
    model = build(GQA)
    (point,) = roofline.measure_points(model, [(1, 12, 3)], repeats=2)
    assert point["flops"] == roofline.forward_flops(GQA, 1, 12, batch_size=3)
    assert point["intensity"] == pytest.approx(roofline.arithmetic_intensity(GQA, 1, 12, 4, batch_size=3))
    assert point["flops_per_s"] == pytest.approx(point["flops"] / point["seconds"]["median"])


@pytest.mark.gpu
def test_measured_gpu_ceilings_are_in_a_plausible_range():
    assert 1e12 < roofline.measure_matmul_flops("cuda", torch.bfloat16, n=4096) < 1e16
    assert 1e11 < roofline.measure_copy_bandwidth("cuda", nbytes=2**30) < 1e14


@pytest.mark.gpu
def test_time_forward_on_the_gpu_is_timed_with_events():
    seconds = roofline.time_forward(build(GQA).cuda(), 1, 10, batch_size=2, repeats=3)
    assert len(seconds) == 3 and all(0 < s < 1 for s in seconds)
