"""The model's shape, read from a Hugging Face `config.json`.

One decoder serves four families; they differ only in a few switches:
Qwen2 adds biases to the q/k/v projections, Qwen3 normalises each query and key head
(q/k-norm), Llama 3 rescales RoPE frequencies for long context, Mistral is Llama's shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., "factor": ...}; empty = none

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Build from the dict in `config.json`; refuses what the model code cannot run."""
        architecture = (hf.get("architectures") or ["<missing>"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}; llminfer supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = read_rope_parameters(hf)
        rope_theta = read_positive(rope, "rope_theta", integer=False)
        rope.pop("rope_theta")   # what is left describes the scaling
        context = read_positive(hf, "max_position_embeddings")
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        if window is not None and window < context:
            raise ValueError(f"sliding-window attention (sliding_window={window}) is not supported")
        eos = hf.get("eos_token_id")
        hidden_size, num_heads = read_positive(hf, "hidden_size"), read_positive(hf, "num_attention_heads")
        bias = hf.get("attention_bias", False)
        return cls(
            architecture=architecture,
            vocab_size=read_positive(hf, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=read_positive(hf, "intermediate_size"),
            num_layers=read_positive(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=read_positive(hf, "num_key_value_heads", default=num_heads),
            head_dim=read_positive(hf, "head_dim", default=hidden_size // num_heads),
            rms_norm_eps=read_positive(hf, "rms_norm_eps", 1e-6, integer=False),
            rope_theta=rope_theta,
            max_position_embeddings=context,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            qkv_bias=architecture == "Qwen2ForCausalLM" or bias,   # Qwen2 always has q/k/v biases
            o_bias=architecture != "Qwen2ForCausalLM" and bias,
            qk_norm=architecture == "Qwen3ForCausalLM",
            rope_scaling={} if rope["rope_type"] == "default" else rope,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` in the model directory `path`; every error names the file."""
        file = Path(path) / "config.json"
        hf = read_json_object(file)
        try:
            return cls.from_hf(hf)
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from exc


def read_json_object(file: Path) -> dict:
    """The JSON object stored in `file`; a ValueError naming the file if it holds none."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:   # invalid JSON or invalid UTF-8
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{file} should hold a JSON object {{...}}, it holds a {type(value).__name__}")
    return value


def read_positive(hf: dict, key: str, default: float | None = None, integer: bool = True) -> float:
    """`hf[key]`, which must be a positive int (any positive number if not `integer`); `default` when the
    key is absent or null, if one is given."""
    value = hf.get(key)
    if value is None and default is not None:
        return default
    if key not in hf:
        raise ValueError(f"required key {key!r} is missing")
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise ValueError(f"{key} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return value if integer else float(value)


def read_rope_parameters(hf: dict) -> dict:
    """RoPE settings from either layout: `rope_parameters` (transformers >= 5), or the older
    `rope_theta` + `rope_scaling` that most Hub checkpoints still use."""
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:
        rope = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE scaling type {rope['rope_type']!r}; llminfer supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return rope
