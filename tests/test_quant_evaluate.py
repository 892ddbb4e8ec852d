"""`llminfer.quant.evaluate`: the even/odd split of a method's loss change, checked against closed forms."""

import copy

import pytest
import torch
from conftest import assert_close

from llminfer import load_model
from llminfer.quant.calibration import calibration_ids
from llminfer.quant.evaluate import evaluate_methods, float_reference, mirrored
from llminfer.quant.formats import quantize_int4
from llminfer.quant.quantize import decoder_linears, quantize_model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model("tiny-shakespeare", device="cpu", dtype=torch.float32)


def test_the_mirror_moves_each_weight_by_minus_its_rounding_error(model_and_tokenizer):
    model, _ = model_and_tokenizer
    quantized = quantize_model(copy.deepcopy(model), "int4", group_size=32)
    mirror = mirrored(model, quantized)
    for name, linear in decoder_linears(mirror).items():
        w0 = decoder_linears(model)[name].weight
        assert torch.equal(linear.weight, w0 - (quantize_int4(w0, 32).dequantize() - w0))
    assert torch.equal(mirror.embed_tokens.weight, model.embed_tokens.weight)


def test_awqs_reference_is_the_same_function_in_the_basis_awq_rounds_in(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = calibration_ids(tokenizer, 1024)
    reference = float_reference(model, "awq", ids, {"group_size": 128})
    probe = torch.randint(0, model.config.vocab_size, (2, 40))
    assert_close(reference(probe), model(probe))
    quantized = quantize_model(copy.deepcopy(model), "awq", ids, group_size=128, clip=False)
    # Without clipping, AWQ is round-to-nearest of the scaled weights: each error is at most half a step.
    for name, linear in decoder_linears(reference).items():
        layer = decoder_linears(quantized)[name]
        step = layer.scales.repeat_interleave(128, dim=1)
        assert ((layer.dequantize() - linear.weight).abs() <= step / 2 + 1e-6).all(), name


def test_the_even_and_odd_parts_add_up_to_the_change_and_only_weight_only_rows_get_them():
    rows = evaluate_methods([("float", {}), ("int4", {"group_size": 128}), ("w8a8", {}),
                             ("float", {"kv_cache_dtype": "int8"})], max_chars=1500, calibration_tokens=512,
                            split=True)
    base = rows[0]["nats_per_char"]
    int4 = rows[1]
    assert int4["even"] + int4["odd"] == pytest.approx(int4["nats_per_char"] - base, abs=1e-12)
    assert int4["even"] > 0            # rounding error costs loss, to second order, whichever way it points
    assert all("even" not in row for row in (rows[0], rows[2], rows[3]))
