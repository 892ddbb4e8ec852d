"""GPTQ checkpoints: save and load give back the same layers; the saved tensors decode, by GPTQ's documented
packing written out here with numpy bit operations (and by compressed-tensors' unpacker, as vLLM uses it), to
the weights the model computes with; a config that contradicts its tensors is refused, naming the mismatch."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from llminfer.models.loader import load_model
from llminfer.models.registry import resolve_model_path
from llminfer.quant import load_gptq, quantize_model, save_gptq
from llminfer.quant.checkpoint import pack_int32, unpack_int32
from llminfer.quant.formats import quantize_int4
from llminfer.quant.quantize import decoder_linears

BASE = "llama-tiny-random"   # hidden 64, intermediate 128, 2 layers, grouped-query attention


def gptq_model(act_order: bool = False, symmetric: bool = True):
    model, _ = load_model(BASE, device="cpu")
    calibration = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(0))
    return quantize_model(model, "gptq", calibration, group_size=32, symmetric=symmetric, act_order=act_order)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An act-order, asymmetric GPTQ model and its checkpoint with fp32 scales."""
    model = gptq_model(act_order=True, symmetric=False)
    path = save_gptq(model, tmp_path_factory.mktemp("gptq"), BASE, scales_dtype=torch.float32)
    return model, path


def test_int32_packing_round_trips_and_puts_the_first_code_lowest():
    codes = torch.randint(0, 16, (16, 24), dtype=torch.uint8)
    for dim in (0, 1):
        assert torch.equal(unpack_int32(pack_int32(codes, dim), dim), codes)
    word = pack_int32(torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]], dtype=torch.uint8), dim=0)
    assert word.dtype == torch.int32 and word.item() == np.int32(np.uint32(0xF7654321))


def test_save_then_load_gives_the_same_layers_and_logits(saved):
    model, path = saved
    loaded, tokenizer = load_gptq(path, device="cpu")
    for name, layer in decoder_linears(model).items():
        expected, actual = layer.int4_weight(), loaded.get_submodule(name).int4_weight()
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(actual, field), getattr(expected, field)), f"{name}.{field}"
    ids = torch.tensor([tokenizer.encode("ROMEO: what light")])
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_fp16_scales_are_the_only_rounding(tmp_path):
    model = gptq_model()
    loaded, _ = load_gptq(save_gptq(model, tmp_path, BASE), device="cpu")
    for name, layer in decoder_linears(model).items():
        expected, actual = layer.int4_weight(), loaded.get_submodule(name).int4_weight()
        assert torch.equal(actual.codes, expected.codes) and torch.equal(actual.zeros, expected.zeros)
        assert torch.equal(actual.scales, expected.scales.half().float())
        torch.testing.assert_close(actual.dequantize(), expected.dequantize(), rtol=2**-11, atol=1e-6)


def test_config_describes_the_tensors(saved):
    model, path = saved
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
                      "checkpoint_format": "gptq"}
    tensors = load_file(path / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (128 // 8, 64)
    assert tensors["model.layers.0.mlp.down_proj.qzeros"].shape == (128 // 32, 64 // 8)
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (128 // 32, 64)
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors


def numpy_dequantize(tensors: dict, prefix: str) -> np.ndarray:
    """GPTQ's layout decoded from its description: qweight [in/8, out] holds input rows 8r..8r+7 in bits 0-3,
    4-7, ..., 28-31 of row r; qzeros [groups, out/8] likewise along the outputs, storing zero - 1; the weight
    is (q - zero[g_idx]) * scale[g_idx]. Returns W^T [in, out]."""
    qweight = tensors[f"{prefix}.qweight"].view(np.uint32)
    qzeros = tensors[f"{prefix}.qzeros"].view(np.uint32)
    scales, g_idx = tensors[f"{prefix}.scales"].astype(np.float64), tensors[f"{prefix}.g_idx"]
    q = np.zeros((qweight.shape[0] * 8, qweight.shape[1]), dtype=np.int64)
    zeros = np.zeros((qzeros.shape[0], qzeros.shape[1] * 8), dtype=np.int64)
    for j in range(8):
        q[j::8, :] = (qweight >> np.uint32(4 * j)) & np.uint32(0xF)
        zeros[:, j::8] = ((qzeros >> np.uint32(4 * j)) & np.uint32(0xF)) + 1
    return (q - zeros[g_idx, :]) * scales[g_idx, :]


def test_saved_tensors_decode_independently_to_the_model_weights(saved):
    model, path = saved
    tensors = load_file(path / "model.safetensors")
    for name, layer in decoder_linears(model).items():
        decoded = numpy_dequantize(tensors, f"model.{name}")
        np.testing.assert_allclose(decoded.T, layer.dequantize().double().numpy(), rtol=1e-6, atol=1e-7)


def test_compressed_tensors_unpacks_the_same_codes(saved):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    model, path = saved
    tensors = load_file(path / "model.safetensors")
    for name, layer in decoder_linears(model).items():
        weight, prefix = layer.int4_weight(), f"model.{name}"
        # compressed-tensors stores signed int4 (code - 8); GPTQ's qweight packs along dim 0, qzeros along dim 1
        codes = helpers.unpack_from_int32(torch.from_numpy(tensors[f"{prefix}.qweight"]), 4,
                                          torch.Size([layer.in_features, layer.out_features]), packed_dim=0)
        assert torch.equal(codes.int() + 8, weight.codes.T.int()), name
        groups = layer.in_features // 32
        zeros = helpers.unpack_from_int32(torch.from_numpy(tensors[f"{prefix}.qzeros"]), 4,
                                          torch.Size([groups, layer.out_features]), packed_dim=1)
        assert torch.equal((zeros.int() + 8 + 1) % 16, weight.zeros.T.int()), name


def rewrite_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"bits": 8}, "bits=8"),
    ({"quant_method": "awq"}, "quant_method 'gptq'"),
    ({"group_size": 64}, r"q_proj.qzeros has shape \(2, 8\), but group_size 64 and the layer's 64 inputs x 64 "
                         r"outputs need \(1, 8\)"),
    ({"group_size": -1}, "group_size=-1"),
    ({"sym": True}, "sym=true"),
    ({"desc_act": False}, "desc_act=false"),
    ({"desc_act": "yes"}, "desc_act.*bool"),
])
def test_a_config_that_contradicts_the_tensors_is_refused(saved, tmp_path, changes, message):
    _, path = saved
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    rewrite_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        load_gptq(tmp_path, device="cpu")


def test_only_int4_models_can_be_saved(tmp_path):
    model, _ = load_model(BASE, device="cpu")
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj is Linear, not Int4Linear"):
        save_gptq(model, tmp_path, BASE)
    with pytest.raises(ValueError, match="is Int8Linear"):
        save_gptq(quantize_model(model, "int8"), tmp_path, BASE)


def test_the_llm_loads_a_gptq_checkpoint_as_stored_and_generates_what_the_model_does(saved):
    from llminfer import LLM, SamplingParams
    from llminfer.quant.linear import Int4Linear

    model, path = saved
    llm = LLM(str(path), device="cpu", cpu_threads=1, max_model_len=128)
    assert llm.quantization == "gptq"
    assert all(isinstance(m, Int4Linear) for m in decoder_linears(llm.model).values())
    prompt = [5, 17, 300, 2, 9]
    got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    want = []
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):   # greedy continuation by the in-memory model, the independent reference
            want.append(int(model(ids)[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
    assert got == want
    assert LLM(str(path), device="cpu", quantization="gptq", max_model_len=128).quantization == "gptq"


@pytest.mark.parametrize("quantization", ["int8", "awq", "w8a8"])
def test_a_quantization_that_contradicts_the_checkpoint_is_refused(saved, quantization):
    from llminfer import LLM

    with pytest.raises(ValueError, match=f"holds GPTQ weights; quantization='{quantization}' does not match"):
        LLM(str(saved[1]), device="cpu", quantization=quantization)


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "bitsandbytes", "bits": 4}, "is a .bitsandbytes. checkpoint"),
    ({"bits": 4}, "must be an object with a quant_method"),
    ("gptq", "must be an object with a quant_method")])
def test_checkpoints_llminfer_cannot_read_are_refused_naming_the_method(saved, tmp_path, config, message):
    from llminfer import LLM

    shutil.copytree(saved[1], tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    data = json.loads(config_path.read_text())
    data["quantization_config"] = config
    config_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path / "ckpt"), device="cpu")


def write_awq_checkpoint(directory, model, group_size: int):
    """AutoAWQ's gemm layout, written here from its description, independently of llminfer's reader: qweight
    int32 [in, out / 8] with output channel 8w + (0, 2, 4, 6, 1, 3, 5, 7)[j] in nibble j of word w, qzeros the
    same over groups, scales [groups, out]. Returns the Int4Weight of each layer."""
    from safetensors.torch import save_file

    def pack(codes_by_output):   # uint8 [rows, out] -> int32 [rows, out / 8]
        rows, outs = codes_by_output.shape
        words = np.zeros((rows, outs // 8), dtype=np.uint32)
        for j, channel in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            words |= codes_by_output[:, channel::8].numpy().astype(np.uint32) << np.uint32(4 * j)
        return torch.from_numpy(words.view(np.int32))

    tensors, weights = {}, {}
    for name, value in model.state_dict().items():
        if not any(name.startswith(f"{layer}.") for layer in decoder_linears(model)):
            tensors[f"model.{name}" if not name.startswith("lm_head") else name] = value.contiguous()
    for name, linear in decoder_linears(model).items():
        q = quantize_int4(linear.weight, group_size, symmetric=False)
        weights[name] = q
        tensors[f"model.{name}.qweight"] = pack(q.codes.T.contiguous())
        tensors[f"model.{name}.qzeros"] = pack(q.zeros.T.contiguous())
        tensors[f"model.{name}.scales"] = q.scales.T.contiguous().to(torch.float16)
        if linear.bias is not None:
            tensors[f"model.{name}.bias"] = linear.bias.detach().contiguous()
    shutil.copytree(resolve_model_path(BASE), directory, dirs_exist_ok=True)
    (directory / "model.safetensors").unlink()
    save_file(tensors, str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                     "version": "gemm"}
    (directory / "config.json").write_text(json.dumps(config))
    return weights


def test_the_llm_loads_an_awq_gemm_checkpoint_to_the_weights_it_stores(tmp_path):
    from llminfer import LLM

    model, _ = load_model(BASE, device="cpu")
    weights = write_awq_checkpoint(tmp_path, model, group_size=32)
    llm = LLM(str(tmp_path), device="cpu", cpu_threads=1, max_model_len=128)
    assert llm.quantization == "awq"
    for name, layer in decoder_linears(llm.model).items():
        expected = weights[name]
        half = (expected.scales.half().float())   # the checkpoint stores fp16 scales
        want = (expected.codes.float() - expected.zeros.repeat_interleave(32, 1).float()) \
            * half.repeat_interleave(32, 1)
        torch.testing.assert_close(layer.dequantize(), want, rtol=0, atol=0)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason in ("length", "stop")
    with pytest.raises(ValueError, match="holds AWQ weights; quantization='gptq' does not match"):
        LLM(str(tmp_path), device="cpu", quantization="gptq")


def test_an_awq_checkpoint_in_another_layout_or_shape_is_refused(tmp_path):
    from llminfer import LLM

    model, _ = load_model(BASE, device="cpu")
    write_awq_checkpoint(tmp_path, model, group_size=32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only AWQ's 'gemm' layout"):
        LLM(str(tmp_path), device="cpu")
    config["quantization_config"].update(version="gemm", group_size=16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="qzeros has shape"):
        LLM(str(tmp_path), device="cpu")
