"""`LLM(model, quantization=...)`: the engine serves the quantized model, batched and paged, and produces what the
same quantized weights produce one full forward pass at a time; bad values are refused with the value named."""

import copy

import pytest
import torch

from llminfer import LLM, SamplingParams
from llminfer.generate import generate_tokens_no_cache
from llminfer.models.loader import load_model
from llminfer.quant import Fp8Linear, Int4Linear, Int8Linear, W8A8Linear, quantize_on_load
from llminfer.quant.evaluate import decoder_linear_bytes
from llminfer.quant.quantize import decoder_linears

PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "KING RICHARD III:\nNow is the", "O"]
LAYER = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear, "w8a8": W8A8Linear}


@pytest.fixture(scope="module")
def float_model():
    return load_model("tiny-shakespeare", device="cpu")


@pytest.mark.parametrize("method", LAYER)
def test_the_engine_serves_the_quantized_model(method, float_model):
    model, tokenizer = float_model
    llm = LLM("tiny-shakespeare", device="cpu", quantization=method, cpu_threads=1)
    linears = decoder_linears(llm.model)
    assert linears and all(type(m) is LAYER[method] for m in linears.values())
    assert decoder_linear_bytes(llm.model) < decoder_linear_bytes(model) / 1.9

    reference = quantize_on_load(copy.deepcopy(model), method, tokenizer)
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        with torch.inference_mode():
            expected = list(generate_tokens_no_cache(reference, ids, params))
        assert list(output.outputs[0].token_ids) == expected, (method, prompt)
    if method == "int4":   # 4 bits change the text (8 bits may not, though the weights did change)
        with torch.inference_mode():
            plain = [list(generate_tokens_no_cache(model, tokenizer.encode(p, add_special_tokens=False), params))
                     for p in PROMPTS]
        assert [list(o.outputs[0].token_ids) for o in outputs] != plain


def test_quantization_composes_with_speculation_and_token_prompts():
    params = SamplingParams(temperature=0, max_tokens=32)
    alone = LLM("tiny-shakespeare", device="cpu", quantization="int8", cpu_threads=1)
    fast = LLM("tiny-shakespeare", device="cpu", quantization="int8", cpu_threads=1, skip_tokenizer_init=True,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    ids = [alone.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected = alone.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    got = fast.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert fast.llm_engine.spec_stats.num_drafted > 0


def test_a_calibrated_method_works_without_an_output_tokenizer():
    llm = LLM("tiny-shakespeare", device="cpu", quantization="w8a8", skip_tokenizer_init=True, cpu_threads=1)
    assert llm.tokenizer is None
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("value", ["int3", "", "INT8", "int8 ", "gptq\x00", "ö", 8, 8.0, True, ["int8"], {"int8": 1}])
def test_bad_quantization_values_are_refused_naming_them(value):
    with pytest.raises(ValueError, match="quantization must be None or one of") as info:
        LLM("tiny-shakespeare", device="cpu", quantization=value)
    assert repr(value)[:20] in str(info.value)


def test_what_llminfer_does_not_implement_is_refused_with_its_meaning():
    with pytest.raises(ValueError, match="swap_space: in vLLM this argument swaps preempted requests"):
        LLM("tiny-shakespeare", device="cpu", swap_space=4)
