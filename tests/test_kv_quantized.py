"""The quantized KV cache (`llminfer.kv.quantized`): rows of one-byte codes and a scale, written by the torch
reference and the Triton store, read by the torch references, the C kernel and the Triton kernels, and used by
the engine (`kv_cache_dtype`). The references are checked against closed forms and torch's own fp8 casts; the
kernels against the references on the same quantized cache."""

import pytest
import torch
from conftest import assert_close
from test_kernels import DECODE_CASES, PREFILL_CASES, decode_args, make_batch, prefill_args

from llminfer import LLM, SamplingParams, load_model
from llminfer.attention import write_kv
from llminfer.eval import nats_per_char
from llminfer.kernels import (
    cpu,
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_decode_triton,
    paged_attention_prefill,
    paged_attention_prefill_reference,
    paged_attention_prefill_triton,
    store_kv_triton,
)
from llminfer.kv.paged import PagedKVCache, kv_bytes_per_block
from llminfer.kv.quantized import (
    KV_CACHE_DTYPES,
    SCALE_BYTES,
    code_dtype,
    dequantize_rows,
    head_dim_of,
    quantize_rows,
    split_rows,
)
from llminfer.quant.evaluate import ThroughCache

CODES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
GREEDY = SamplingParams(temperature=0, max_tokens=24)
PROMPTS = ["ROMEO:", "To be, or not to be", "JULIET:\nO Romeo, Romeo", "KING"]
needs_c_kernel = pytest.mark.skipif(not cpu.supports(torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 8)),
                                    reason="the CPU kernel cannot be built here")


def quantized_batch(batch, dtype: torch.dtype):
    """The batch with its caches quantized row by row (unused slots too: they hold finite junk)."""
    batch.k_cache, batch.v_cache = quantize_rows(batch.k_cache, dtype), quantize_rows(batch.v_cache, dtype)
    return batch


def dequantized(batch):
    """The same batch over the fp32 cache the codes stand for."""
    k, v = dequantize_rows(batch.k_cache), dequantize_rows(batch.v_cache)
    return type(batch)(**{**batch.__dict__, "k_cache": k, "v_cache": v})


# --- the format ---------------------------------------------------------------------------------------------------

def test_int8_rows_round_to_nearest_with_the_rows_own_scale():
    x = torch.randn(50, 3, 24) * torch.logspace(-3, 3, 50)[:, None, None]
    rows = quantize_rows(x, torch.int8)
    assert rows.shape == (50, 3, 24 + SCALE_BYTES) and rows.dtype == torch.int8 and head_dim_of(rows) == 24
    codes, scales = split_rows(rows)
    # Closed form: scale = max|x| / 127, and each value is off by at most half a step.
    torch.testing.assert_close(scales[..., 0], x.abs().amax(-1) / 127)
    assert codes.abs().max() == 127
    assert ((dequantize_rows(rows) - x).abs() <= scales * 0.5 * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_rows_are_torchs_fp8_cast_of_x_over_the_scale(dtype):
    x = torch.randn(40, 2, 16) * 5
    codes, scales = split_rows(quantize_rows(x, dtype))
    largest = torch.finfo(dtype).max
    torch.testing.assert_close(scales[..., 0], x.abs().amax(-1) / largest)
    # Independent reference: torch's own cast of the scaled values (never NaN: the largest maps to +-largest).
    assert torch.equal(codes.float(), (x / scales).to(dtype).float())
    assert codes.float().abs().amax() == largest


@pytest.mark.parametrize("name", CODES)
def test_zero_tiny_and_huge_rows_stay_finite(name):
    x = torch.zeros(4, 1, 8)
    x[1] = 1e-38
    x[2, 0, 3] = 3e38
    x[3] = -1e-45
    out = dequantize_rows(quantize_rows(x, CODES[name]))
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0
    assert out[2, 0, 3] == pytest.approx(3e38, rel=1e-6)


@pytest.mark.parametrize("value", ["int4", "FP8", "fp8 ", "", None.__class__.__name__, 8, 1.0, True, ["int8"], "🙂"])
def test_unknown_cache_dtypes_are_refused_naming_them(value):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of") as info:
        code_dtype(value)
    assert repr(value) in str(info.value)


def test_a_quantized_block_holds_one_byte_per_value_plus_each_rows_scale():
    model, _ = load_model("tiny-shakespeare", device="cpu")
    c = model.config
    fp32 = kv_bytes_per_block(c, 16, torch.float32)
    int8 = kv_bytes_per_block(c, 16, torch.float32, "int8")
    assert fp32 == 2 * c.num_layers * 16 * c.num_kv_heads * c.head_dim * 4
    assert int8 == 2 * c.num_layers * 16 * c.num_kv_heads * (c.head_dim + 4)
    cache = PagedKVCache(c, 3, 16, kv_cache_dtype="fp8")
    assert cache.nbytes == 3 * kv_bytes_per_block(c, 16, torch.float32, "fp8")
    assert cache.k.dtype == torch.float8_e4m3fn


# --- writing: the torch reference and the Triton store ------------------------------------------------------------

@pytest.mark.parametrize("name", CODES)
def test_write_kv_stores_each_rows_codes_and_scale_and_skips_padding(name):
    dtype = CODES[name]
    k_cache = quantize_rows(torch.randn(5, 4, 2, 8), dtype)
    v_cache = quantize_rows(torch.randn(5, 4, 2, 8), dtype)
    before_k = k_cache.clone()
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv(k_cache, v_cache, k, v, torch.tensor([6, -1, 19]))
    flat = k_cache.view(torch.uint8).view(20, 2, -1)
    assert torch.equal(flat[6], quantize_rows(k[0], dtype).view(torch.uint8))
    assert torch.equal(flat[19], quantize_rows(k[2], dtype).view(torch.uint8))
    untouched = [s for s in range(20) if s not in (6, 19)]
    assert torch.equal(flat[untouched], before_k.view(torch.uint8).view(20, 2, -1)[untouched])
    assert torch.equal(v_cache.view(torch.uint8).view(20, 2, -1)[6], quantize_rows(v[0], dtype).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_triton_store_writes_the_same_int8_rows_as_the_reference(dtype):
    k_cache = quantize_rows(torch.randn(6, 4, 3, 24), torch.int8)
    v_cache = k_cache.clone()
    k, v = (torch.randn(7, 3, 24) * 4).to(dtype), torch.randn(7, 3, 24).to(dtype)
    k[2] = 0   # an all-zero row gets the smallest scale, not a division by zero
    slots = torch.tensor([0, 5, -1, 23, 9, 10, 11])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv(expected_k, expected_v, k, v, slots)
    store_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_the_triton_store_writes_the_same_fp8_rows_as_the_reference_on_a_gpu(dtype):
    # Not in the interpreter: its fp32 -> fp8 cast (triton 3.9) drops the carry when rounding up to a power of
    # two (1.9 x 2^6 becomes 64, not 128); the GPU's cvt rounds to nearest.
    k_cache = quantize_rows(torch.randn(6, 4, 3, 24, device="cuda"), dtype)
    v_cache = k_cache.clone()
    k, v = torch.randn(7, 3, 24, device="cuda") * 4, torch.randn(7, 3, 24, device="cuda")
    slots = torch.tensor([0, 5, -1, 23, 9, 10, 11], device="cuda")
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv(expected_k, expected_v, k, v, slots)
    store_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), expected_v.view(torch.uint8))


# --- reading: references, the C kernel and the Triton kernels -----------------------------------------------------

@pytest.mark.parametrize("name", CODES)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_reference_reads_the_values_the_codes_stand_for(case, name):
    lens, kv_heads, group, head_dim, block_size, _ = DECODE_CASES[case]
    batch = quantized_batch(make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim,
                                       block_size, torch.float32), CODES[name])
    got = paged_attention_decode_reference(*decode_args(batch))
    assert_close(got, paged_attention_decode_reference(*decode_args(dequantized(batch))))


@pytest.mark.parametrize("name", CODES)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_reference_reads_the_values_the_codes_stand_for(case, name):
    cached, new, kv_heads, group, head_dim, block_size, _ = PREFILL_CASES[case]
    batch = quantized_batch(make_batch(cached, new, kv_heads, group, head_dim, block_size, torch.float32),
                            CODES[name])
    got = paged_attention_prefill_reference(*prefill_args(batch))
    assert_close(got, paged_attention_prefill_reference(*prefill_args(dequantized(batch))))


@needs_c_kernel
@pytest.mark.parametrize("name", CODES)
@pytest.mark.parametrize("case", ["decode", "prefill"])
def test_the_c_kernel_matches_the_reference_on_a_quantized_cache(case, name, monkeypatch):
    if case == "decode":
        lens, kv_heads, group, head_dim, block_size, _ = DECODE_CASES["gqa4-d80-bs8"]
        batch = make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim, block_size,
                           torch.float32)
    else:
        batch = make_batch(*PREFILL_CASES["gqa3-d24-bs4"][:6], torch.float32)
    batch = quantized_batch(batch, CODES[name])
    assert cpu.supports(batch.q, batch.k_cache)
    calls = []
    monkeypatch.setattr(cpu, "attend_rows", lambda *a, _f=cpu.attend_rows: calls.append(1) or _f(*a))
    if case == "decode":
        got, want = paged_attention_decode(*decode_args(batch)), paged_attention_decode_reference(*decode_args(batch))
    else:
        got = paged_attention_prefill(*prefill_args(batch))
        want = paged_attention_prefill_reference(*prefill_args(batch))
    assert calls, "the C kernel did not run"
    assert_close(got, want)


@needs_c_kernel
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_the_c_kernel_decodes_every_fp8_code_as_torch_does(name):
    # A row that sees one key returns that key's value exactly: put every finite code in some value row.
    dtype = CODES[name]
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    codes = codes[torch.isfinite(codes.float())]
    head_dim = 16
    codes = torch.cat([codes, codes[: (-codes.numel()) % head_dim]]).view(-1, 1, head_dim)   # [rows, 1, d]
    rows = codes.shape[0]
    scale = torch.full((rows, 1, 1), 0.75)
    v_cache = torch.cat([codes.view(torch.uint8), scale.view(torch.uint8)], -1).view(dtype).view(rows, 1, 1, -1)
    k_cache = quantize_rows(torch.randn(rows, 1, 1, head_dim), dtype)
    q = torch.randn(rows, 1, head_dim)
    tables = torch.arange(rows, dtype=torch.int32)[:, None]
    got = cpu.paged_attention_rows(q, k_cache, v_cache, tables, torch.arange(rows), torch.ones(rows, dtype=torch.long),
                                   0.5)
    assert torch.equal(got, (codes.float() * 0.75))


@pytest.mark.parametrize("name", CODES)
def test_the_triton_kernels_match_the_reference_on_a_quantized_cache(name):
    dtype = CODES[name]
    lens, kv_heads, group, head_dim, block_size, block_n = DECODE_CASES["gqa3-d24-bs4"]
    batch = quantized_batch(make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim,
                                       block_size, torch.float32), dtype)
    want = paged_attention_decode_reference(*decode_args(batch))
    assert_close(paged_attention_decode_triton(*decode_args(batch), block_n=block_n), want)
    assert_close(paged_attention_decode_triton(*decode_args(batch), block_n=block_n, num_splits=2), want)
    cached, new, kv_heads, group, head_dim, block_size, block_n = PREFILL_CASES["gqa3-d24-bs4"]
    batch = quantized_batch(make_batch(cached, new, kv_heads, group, head_dim, block_size, torch.float16), dtype)
    assert_close(paged_attention_prefill_triton(*prefill_args(batch), block_n=block_n),
                 paged_attention_prefill_reference(*prefill_args(batch)), torch.float16)


def test_kernels_refuse_a_cache_whose_rows_do_not_fit_the_queries():
    batch = quantized_batch(make_batch([3], [1], 1, 1, 8, 4, torch.float32), torch.int8)
    narrow = batch.k_cache[..., :-SCALE_BYTES]   # int8 codes without their scales: head_dim - 4 values per row
    with pytest.raises(ValueError, match="does not fit caches"):
        paged_attention_decode_triton(batch.q, narrow, narrow, batch.block_tables, batch.seq_lens, 1.0, 4)
    with pytest.raises(ValueError, match="does not fit caches"):
        paged_attention_decode_triton(batch.q, batch.k_cache, batch.v_cache.view(torch.float8_e4m3fn),
                                      batch.block_tables, batch.seq_lens, 1.0, 4)


# --- the engine ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model("tiny-shakespeare", device="cpu", dtype=torch.float32)


def test_scoring_through_an_unquantized_cache_equals_the_plain_forward(model_and_tokenizer):
    model, _ = model_and_tokenizer
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    assert_close(ThroughCache(model, "auto")(ids), model(ids))


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_a_quantized_cache_costs_under_one_percent_of_held_out_loss(model_and_tokenizer, name):
    from llminfer.datasets import tinyshakespeare_text, train_val_split
    model, tokenizer = model_and_tokenizer
    text = train_val_split(tinyshakespeare_text())[1][:3000]
    full = nats_per_char(model, tokenizer, text)
    quantized = nats_per_char(ThroughCache(model, name), tokenizer, text)
    assert quantized != full                      # the cache really was quantized
    assert abs(quantized - full) < 0.01 * full


@pytest.mark.parametrize("name", ["int8", "fp8", "fp8_e5m2"])
def test_the_engine_runs_on_a_quantized_cache_and_returns_every_block(name):
    llm = LLM("tiny-shakespeare", device="cpu", kv_cache_dtype=name, max_model_len=256, cpu_threads=1)
    assert llm.llm_engine.kv_cache.k.dtype == KV_CACHE_DTYPES[name]
    outs = llm.generate(PROMPTS, [GREEDY, SamplingParams(temperature=1.0, seed=3, max_tokens=30),
                                  SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=20), GREEDY], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [24, 30, 20, 24]
    pool = llm.llm_engine.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_the_same_memory_holds_about_three_and_a_half_times_the_blocks_in_int8():
    budget = 8 * 2**20
    fp32 = LLM("tiny-shakespeare", device="cpu", kv_cache_memory_bytes=budget, cpu_threads=1)
    int8 = LLM("tiny-shakespeare", device="cpu", kv_cache_memory_bytes=budget, kv_cache_dtype="int8", cpu_threads=1)
    head_dim = fp32.model.config.head_dim
    ratio = int8.llm_engine.pool.num_blocks / fp32.llm_engine.pool.num_blocks
    assert ratio == pytest.approx(4 * head_dim / (head_dim + SCALE_BYTES), rel=0.01)


def test_greedy_speculation_on_an_int8_cache_gives_the_tokens_of_plain_decoding():
    # Each row is quantized with its own scale, so a token's cached K/V do not depend on what else is in the
    # step: verifying k drafts in one pass reads exactly what k + 1 decode steps would.
    plain = LLM("tiny-shakespeare", device="cpu", kv_cache_dtype="int8", cpu_threads=1)
    spec = LLM("tiny-shakespeare", device="cpu", kv_cache_dtype="int8", cpu_threads=1,
               speculative_config={"model": "tiny-shakespeare-draft", "num_speculative_tokens": 3})
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in spec.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == want
    assert spec.llm_engine.spec_stats.num_accepted > 0


@pytest.mark.parametrize("value", ["int4", "FP8", "", None, 8, ["fp8"]])
def test_the_llm_refuses_an_unknown_cache_dtype_before_loading(value):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of") as info:
        LLM("tiny-shakespeare", device="cpu", kv_cache_dtype=value)
    assert repr(value) in str(info.value)
