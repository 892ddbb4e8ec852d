"""Save and load int4 models in GPTQ's checkpoint layout, which AutoGPTQ, transformers and vLLM read; load AWQ's.

Per linear layer `model.layers.{i}.{name}`: `qweight` int32 [in / 8, out], eight 4-bit codes along the input
dimension in each int32 (code 8r + j in bits 4j..4j+3 of row r); `qzeros` int32 [groups, out / 8], the zero
points minus one (the "v1" format's convention, which readers undo), packed the same way along the outputs;
`scales` [groups, out]; `g_idx` int32 [in], each input's group. config.json gets a `quantization_config`.

AWQ's "gemm" layout (AutoAWQ; read by transformers and vLLM) packs along the *outputs* instead: `qweight` int32
[in, out / 8] and `qzeros` int32 [groups, out / 8] hold output channel 8w + AWQ_PACK_ORDER[j] of word w in bits
4j..4j+3 (an interleaving its CUDA kernels unpack cheaply); zero points are stored as they are; `scales`
[groups, out]. Groups are always contiguous (AWQ has no act-order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from llminfer.device import default_device, default_dtype, parse_device
from llminfer.models.config import ModelConfig, read_json_object
from llminfer.models.llama import Llama
from llminfer.models.loader import load_state_dict, load_tokenizer, load_weights
from llminfer.models.registry import resolve_model_path
from llminfer.quant.formats import INT4_MAX, INT4_SYMMETRIC_ZERO, Int4Weight
from llminfer.quant.linear import Int4Linear
from llminfer.quant.quantize import decoder_linears

QUANTIZED = ("qweight", "qzeros", "scales", "g_idx")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble j of a word holds output channel AWQ_PACK_ORDER[j] of its 8
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def pack_int32(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit codes (0..15) per int32 along `dim` of a 2-D tensor, the first code in the lowest bits."""
    codes = codes.transpose(0, dim).to(torch.int64)
    if codes.shape[0] % 8:
        raise ValueError(f"cannot pack {codes.shape[0]} int4 codes into int32s: not a multiple of 8")
    shifts = 4 * torch.arange(8, device=codes.device)
    words = (codes.reshape(-1, 8, codes.shape[1]) << shifts[None, :, None]).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)   # the same 32 bits, read as a signed int32
    return words.to(torch.int32).transpose(0, dim).contiguous()


def unpack_int32(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> uint8 codes, eight per word along `dim`."""
    words = words.transpose(0, dim).to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=words.device)
    codes = (words[:, None, :] >> shifts[None, :, None]) & INT4_MAX
    return codes.reshape(-1, words.shape[1]).to(torch.uint8).transpose(0, dim).contiguous()


def save_gptq(model: Llama, directory: str | Path, base_model: str | Path,
              scales_dtype: torch.dtype = torch.float16) -> Path:
    """Write `model` (every decoder linear an `Int4Linear`) to `directory` in GPTQ's layout, with config.json and
    the tokenizer taken from `base_model` (the name or directory it was loaded from). Scales are stored in
    `scales_dtype`: fp16 as GPTQ's kernels expect (a relative rounding of at most 2^-11), or fp32 exactly."""
    linears = decoder_linears(model)
    wrong = [name for name, module in linears.items() if not isinstance(module, Int4Linear)]
    if wrong:
        raise ValueError(f"GPTQ checkpoints hold int4 layers only; {wrong[0]} is {type(linears[wrong[0]]).__name__}, "
                         "not Int4Linear")
    group_sizes = {module.group_size for module in linears.values()}
    if len(group_sizes) != 1:
        raise ValueError(f"GPTQ checkpoints have one group size, the model has {sorted(group_sizes)}")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in linears.items():
        weight = module.int4_weight()
        prefix = f"model.{name}"
        tensors[f"{prefix}.qweight"] = pack_int32(weight.codes.T, dim=0)
        tensors[f"{prefix}.qzeros"] = pack_int32((weight.zeros.T.long() - 1) & INT4_MAX, dim=1)
        tensors[f"{prefix}.scales"] = weight.scales.T.to(scales_dtype).contiguous()
        tensors[f"{prefix}.g_idx"] = weight.group_index().to(torch.int32)
    for name, param in model.named_parameters():   # embeddings, norms, LM head, biases: as they are
        tensors[name if name.startswith("lm_head") else f"model.{name}"] = param.detach().contiguous()
    directory, base = Path(directory), resolve_model_path(base_model)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.cpu() for name, t in tensors.items()}, directory / "model.safetensors")
    config = read_json_object(base / "config.json")
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": 4, "group_size": group_sizes.pop(), "checkpoint_format": "gptq",
        "desc_act": any(module.g_idx is not None for module in linears.values()),
        "sym": all(bool((module.zeros == INT4_SYMMETRIC_ZERO).all()) for module in linears.values()),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in COPIED_FILES:
        if (base / file).is_file():
            shutil.copy(base / file, directory / file)
    return directory


def checkpoint_method(path: str | Path) -> str | None:
    """The quant_method of a checkpoint directory's quantization_config ("gptq", "awq", ...), or None when its
    config.json has none (a float checkpoint)."""
    config = read_json_object(Path(path) / "config.json").get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, dict) or not isinstance(config.get("quant_method"), str):
        raise ValueError(f"{Path(path) / 'config.json'}: quantization_config must be an object with a quant_method, "
                         f"got {config!r:.200}")
    return config["quant_method"]


def read_quantization_config(path: Path, method: str = "gptq") -> dict:
    """config.json's quantization_config, checked to describe 4-bit GPTQ (or AWQ's gemm layout)."""
    config = read_json_object(path / "config.json").get("quantization_config")
    if not isinstance(config, dict) or config.get("quant_method") != method:
        raise ValueError(f"{path / 'config.json'} has no quantization_config with quant_method {method!r}")
    if config.get("bits", config.get("w_bit")) != 4:
        raise ValueError(f"quantization_config has bits={config.get('bits')!r}; only 4-bit {method} can be loaded")
    if method == "awq":
        config = {**config, "group_size": config.get("group_size", config.get("q_group_size"))}
        if str(config.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"quantization_config has version={config.get('version')!r}; only AWQ's 'gemm' layout "
                             "can be loaded")
    keys = (("group_size", int), ("desc_act", bool), ("sym", bool)) if method == "gptq" else (("group_size", int),)
    for key, kind in keys:
        if type(config.get(key)) is not kind:
            raise ValueError(f"quantization_config[{key!r}] should be a {kind.__name__}, got {config.get(key)!r}")
    if config["group_size"] <= 0:
        raise ValueError(f"quantization_config has group_size={config['group_size']}; only positive group sizes "
                         "(not -1, one group per row) can be loaded")
    return config


def check_layer_tensors(tensors: dict[str, torch.Tensor], name: str, expected: dict[str, tuple], group_size: int,
                        in_features: int, out_features: int) -> None:
    """Raise ValueError unless each `{name}.{key}` is in the checkpoint with the shape `expected[key]`."""
    for key, shape in expected.items():
        if f"{name}.{key}" not in tensors:
            raise ValueError(f"{name}.{key} is missing from the checkpoint")
        if tuple(tensors[f"{name}.{key}"].shape) != shape:
            raise ValueError(f"{name}.{key} has shape {tuple(tensors[f'{name}.{key}'].shape)}, but group_size "
                             f"{group_size} and the layer's {in_features} inputs x {out_features} outputs need {shape}")


def int4_weight_from_gptq(tensors: dict[str, torch.Tensor], name: str, in_features: int, out_features: int,
                          config: dict) -> Int4Weight:
    """One layer's GPTQ tensors, checked against the layer's shape and the quantization_config, as an `Int4Weight`."""
    group_size = config["group_size"]
    groups = in_features // group_size if in_features % group_size == 0 else None
    expected = {"qweight": (in_features // 8, out_features), "qzeros": (groups, out_features // 8),
                "scales": (groups, out_features), "g_idx": (in_features,)}
    check_layer_tensors(tensors, name, expected, group_size, in_features, out_features)
    codes = unpack_int32(tensors[f"{name}.qweight"], dim=0).T
    # "gptq" (v1) checkpoints store zero - 1; "gptq_v2" the zero point itself.
    offset = 0 if config.get("checkpoint_format") == "gptq_v2" else 1
    zeros = ((unpack_int32(tensors[f"{name}.qzeros"], dim=1).long() + offset) & INT4_MAX).to(torch.uint8).T
    g_idx = tensors[f"{name}.g_idx"].to(torch.int32)
    in_order = torch.arange(in_features, device=g_idx.device) // group_size
    if not config["desc_act"] and not torch.equal(g_idx.long(), in_order):
        raise ValueError(f"{name}.g_idx is not in column order, but the quantization_config says desc_act=false")
    if g_idx.min() < 0 or g_idx.max() >= groups:
        raise ValueError(f"{name}.g_idx names groups {g_idx.min()}..{g_idx.max()}; the layer has {groups}")
    if config["sym"] and not bool((zeros == INT4_SYMMETRIC_ZERO).all()):
        raise ValueError(f"{name}.qzeros holds zero points other than {INT4_SYMMETRIC_ZERO}, "
                         "but the quantization_config says sym=true")
    scales = tensors[f"{name}.scales"].float().T.contiguous()
    return Int4Weight(codes.contiguous(), scales, zeros.contiguous(), group_size, g_idx if config["desc_act"] else None)


def load_gptq(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Return `(model, tokenizer)` for a GPTQ checkpoint directory: a `Llama` whose decoder linears are
    `Int4Linear`s holding the checkpoint's codes, scales and zero points."""
    return load_gptq_model(path, device, dtype), load_tokenizer(Path(path))


def int4_weight_from_awq(tensors: dict[str, torch.Tensor], name: str, in_features: int, out_features: int,
                         config: dict) -> Int4Weight:
    """One layer's AWQ (gemm layout) tensors, checked against the layer's shape, as an `Int4Weight`."""
    group_size = config["group_size"]
    if in_features % group_size or out_features % 8:
        raise ValueError(f"{name}: {in_features} inputs x {out_features} outputs do not fit AWQ's layout with "
                         f"group_size {group_size} (inputs a multiple of it, outputs of 8)")
    groups = in_features // group_size
    expected = {"qweight": (in_features, out_features // 8), "qzeros": (groups, out_features // 8),
                "scales": (groups, out_features)}
    check_layer_tensors(tensors, name, expected, group_size, in_features, out_features)
    # unpack_int32 gives nibble j of word w at column 8w + j; nibble j holds channel 8w + AWQ_PACK_ORDER[j].
    order = torch.tensor(AWQ_PACK_ORDER).argsort()
    columns = (torch.arange(out_features // 8)[:, None] * 8 + order[None, :]).flatten()

    def unpack(key: str) -> torch.Tensor:
        return unpack_int32(tensors[f"{name}.{key}"], dim=1)[:, columns.to(tensors[f"{name}.{key}"].device)]

    codes, zeros = unpack("qweight").T, unpack("qzeros").T             # [out, in], [out, groups]
    scales = tensors[f"{name}.scales"].float().T.contiguous()
    return Int4Weight(codes.contiguous(), scales, zeros.contiguous(), group_size)


def load_gptq_model(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    method: str = "gptq"):
    """The model of `load_gptq`, without its tokenizer; `method="awq"` reads AWQ's gemm layout instead."""
    path = Path(path)
    device = parse_device(device) if device is not None else default_device()
    config = read_quantization_config(path, method)
    decode = int4_weight_from_gptq if method == "gptq" else int4_weight_from_awq
    with torch.device("meta"):
        model = Llama(ModelConfig.from_pretrained(path))
    model = model.to_empty(device=device).to(dtype or default_dtype(device))
    tensors = {name.removeprefix("model."): t.to(device) for name, t in load_state_dict(path).items()}
    for name, linear in decoder_linears(model).items():
        weight = decode(tensors, name, linear.in_features, linear.out_features, config)
        bias = torch.zeros(linear.out_features, device=device) if f"{name}.bias" in tensors else None
        model.set_submodule(name, Int4Linear(weight, bias))   # load_weights fills the bias
        for key in QUANTIZED:
            tensors.pop(f"{name}.{key}", None)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    try:
        load_weights(model, tensors)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return model.eval()
