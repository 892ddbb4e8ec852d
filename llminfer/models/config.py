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
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        if window is not None and window < hf["max_position_embeddings"]:
            raise ValueError(f"sliding-window attention (sliding_window={window}) is not supported")
        eos = hf.get("eos_token_id")
        num_heads = hf["num_attention_heads"]
        bias = hf.get("attention_bias", False)
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.pop("rope_theta")),
            max_position_embeddings=hf["max_position_embeddings"],
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
        return cls.from_hf(json.loads((Path(path) / "config.json").read_text()))


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
