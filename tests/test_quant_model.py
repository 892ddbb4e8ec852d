"""quantize_model: every decoder linear swapped for its quantized layer, the rest untouched, outputs near the float
model's; GPTQ quantizes layer after layer on the outputs of the layers already quantized; bad requests are
refused with the bad value named."""

import pytest
import torch
from quant_helpers import small_llama

from llminfer.datasets import tinyshakespeare_text, train_val_split
from llminfer.models.loader import load_tokenizer
from llminfer.models.registry import SHIPPED
from llminfer.quant import Fp8Linear, Int4Linear, Int8Linear, W8A8Linear, calibration_ids, quantize_model
from llminfer.quant.calibration import capture_inputs, decoder_inputs
from llminfer.quant.evaluate import decoder_linear_bytes, model_bytes
from llminfer.quant.gptq import gptq_quantize, hessian
from llminfer.quant.quantize import decoder_linears

LAYER_CLASS = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear, "gptq": Int4Linear, "awq": Int4Linear,
               "w8a8": W8A8Linear}
# Relative error of the logits against the float model's; random weights are harder than trained ones.
TOLERANCE = {"int8": 0.02, "fp8": 0.05, "w8a8": 0.05, "int4": 0.25, "gptq": 0.25, "awq": 0.25}


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", LAYER_CLASS)
def test_quantize_model_swaps_every_decoder_linear(method):
    model = small_llama()
    ids, calibration = random_ids(2, 20), random_ids(4, 32, seed=2)
    expected = model(ids)
    embedding, lm_head = model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    float_bytes = model_bytes(model)
    assert quantize_model(model, method, calibration, group_size=32) is model
    linears = decoder_linears(model)
    assert len(linears) == 2 * 7 and all(type(m) is LAYER_CLASS[method] for m in linears.values())
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, lm_head)
    assert torch.equal(model.embed_tokens.weight, embedding)
    logits = model(ids)
    error = ((logits - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE[method], f"{method}: relative error of the logits {error:.3f}"
    assert model_bytes(model) < float_bytes


def test_weight_bytes_shrink_by_the_format():
    model = small_llama()
    float_bytes = decoder_linear_bytes(model)
    int8 = decoder_linear_bytes(quantize_model(small_llama(), "int8"))
    int4 = decoder_linear_bytes(quantize_model(model, "int4", group_size=32))
    assert 0.25 < int8 / float_bytes < 0.27 and 0.15 < int4 / float_bytes < 0.17


def test_gptq_quantizes_each_layer_on_the_outputs_of_the_quantized_layers_before_it():
    """Re-derive two layers' codes by hand: layer 1's q_proj from the already quantized layer 0's outputs, and
    layer 0's o_proj from its quantized q/k/v. Neither would match with inputs from the float model."""
    model, calibration = small_llama(), random_ids(4, 32, seed=2)
    float_weights = {name: m.weight.clone() for name, m in decoder_linears(model).items()}
    quantize_model(model, "gptq", calibration, group_size=32)
    hidden, cos, sin = decoder_inputs(model, calibration)
    layer0, layer1 = model.layers
    o_input = capture_inputs(layer0, (hidden, cos, sin), {"o": layer0.self_attn.o_proj})["o"]
    q_input = capture_inputs(layer1, (layer0(hidden, cos, sin), cos, sin), {"q": layer1.self_attn.q_proj})["q"]
    for name, x in (("layers.0.self_attn.o_proj", o_input), ("layers.1.self_attn.q_proj", q_input)):
        expected = gptq_quantize(float_weights[name], hessian(x), 32)
        assert torch.equal(model.get_submodule(name).int4_weight().codes, expected.codes), name


def test_unknown_methods_and_bad_requests_are_named():
    model, calibration = small_llama(), random_ids(2, 16)
    with pytest.raises(ValueError, match="'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 64 of layers.0"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(ValueError, match="group_size 128 does not divide the input dimension 64"):
        quantize_model(model, "awq", calibration)   # the default group size is too large for this model
    for method in ("gptq", "awq", "w8a8"):
        with pytest.raises(ValueError, match=f"method '{method}' needs calibration data"):
            quantize_model(model, method, group_size=32)
    with pytest.raises(ValueError, match="exceed the model's context 128"):
        quantize_model(model, "w8a8", random_ids(1, 200))
    with pytest.raises(ValueError, match="int64 tensor"):
        quantize_model(model, "w8a8", [[1, 2, 3]])
    with pytest.raises(ValueError, match=r"0..96, got 0..97"):
        quantize_model(model, "w8a8", torch.tensor([[0, 97]]))
    assert all(type(m) is torch.nn.Linear for m in decoder_linears(model).values())   # nothing half-done
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4", group_size=32)


def test_calibration_ids_are_windows_of_the_training_text_only():
    tokenizer = load_tokenizer(SHIPPED["tiny-shakespeare"])
    ids = calibration_ids(tokenizer, num_tokens=1000, seq_len=256)
    assert ids.shape == (3, 256) and ids.dtype == torch.long
    train, held_out = train_val_split(tinyshakespeare_text())
    for window in ids:
        text = tokenizer.decode(window)
        assert text in train and text not in held_out
    assert torch.equal(ids, calibration_ids(tokenizer, num_tokens=1000, seq_len=256))   # seeded
    with pytest.raises(ValueError, match="num_tokens=100, seq_len=256"):
        calibration_ids(tokenizer, num_tokens=100, seq_len=256)
