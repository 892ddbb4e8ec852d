"""llminfer's Llama gives transformers' logits (fp32, 1e-4) on the shipped model and random configs."""

import pytest
import torch
from conftest import assert_close
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from llminfer.models.config import ModelConfig
from llminfer.models.llama import Llama
from llminfer.models.loader import load_checkpoint, load_state_dict, load_weights
from llminfer.models.registry import SHIPPED


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_matches_transformers(name):
    ours = load_checkpoint(SHIPPED[name], device="cpu", dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(SHIPPED[name], dtype=torch.float32).eval()
    for length in (1, 37, 300):
        ids = torch.randint(0, ours.config.vocab_size, (2, length))
        assert_close(our_logits(ours, ids), hf_logits(theirs, ids))


COMMON = dict(vocab_size=101, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=256,
              rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
RANDOM_CONFIGS = {
    "llama-gqa-head_dim-48-single-kv-head-tied": (LlamaConfig, dict(
        hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=48, tie_word_embeddings=True)),
    "llama-mha-untied": (LlamaConfig, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-head_dim-24-not-hidden-over-heads": (LlamaConfig, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=500000.0)),
    "llama3-rope-scaling": (LlamaConfig, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama-linear-rope-scaling": (LlamaConfig, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "llama-attention-bias": (LlamaConfig, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_bias=True)),
    "mistral-gqa": (MistralConfig, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2-qkv-bias-tied": (Qwen2Config, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qk-norm-mqa": (Qwen3Config, dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)),
}


@pytest.fixture(params=sorted(RANDOM_CONFIGS))
def random_checkpoint(request, tmp_path):
    config_class, settings = RANDOM_CONFIGS[request.param]
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config_class(**COMMON, **settings)).eval()
    with torch.no_grad():  # random biases and norm weights, so that a missing one shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_random_configs_match_transformers(random_checkpoint):
    path, theirs = random_checkpoint
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32)
    for length in (1, 5, 200):   # 200 > the scaled configs' original context of 32
        ids = torch.randint(0, 101, (3, length))
        assert_close(our_logits(ours, ids), hf_logits(theirs, ids))


def test_unequal_lengths_each_match(random_checkpoint):
    path, theirs = random_checkpoint
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32)
    for length in (2, 17, 64):
        ids = torch.randint(0, 101, (1, length))
        assert_close(our_logits(ours, ids), hf_logits(theirs, ids))


def test_older_config_keys_are_read():
    """Hub checkpoints written before transformers 5 carry `rope_theta` and `rope_scaling`."""
    old = {**LlamaConfig(num_hidden_layers=1).to_dict(), "architectures": ["LlamaForCausalLM"]}
    old.pop("rope_parameters", None)
    old |= {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    config = ModelConfig.from_hf(old)
    assert config.rope_theta == 500000.0 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_scaling_is_named(rope):
    hf = {**LlamaConfig(num_hidden_layers=1).to_dict(), "architectures": ["LlamaForCausalLM"]}
    hf.pop("rope_parameters", None)
    hf["rope_scaling"] = rope
    with pytest.raises(ValueError, match=rope.get("rope_type", rope.get("type"))):
        ModelConfig.from_hf(hf)


def test_unsupported_architecture_is_named(tmp_path):
    hf = LlamaConfig(num_hidden_layers=1).to_dict() | {"architectures": ["MambaForCausalLM"]}
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        ModelConfig.from_hf(hf)


def test_checkpoint_that_does_not_match_the_config_is_refused(random_checkpoint):
    path, _ = random_checkpoint
    config = ModelConfig.from_pretrained(path)
    tensors = load_state_dict(path)
    missing = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj"):
        load_weights(Llama(config), missing)
    wrong = dict(tensors)
    wrong["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match="model.norm.weight|norm.weight"):
        load_weights(Llama(config), wrong)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    config = LlamaConfig(**COMMON, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(2)
    theirs = AutoModelForCausalLM.from_config(config).eval()
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_checkpoint(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 101, (2, 9))
    assert_close(our_logits(ours, ids), hf_logits(theirs, ids))


def test_flattened_batch_of_unequal_lengths_matches_transformers(random_checkpoint):
    """The engine's batch shape: prompts of different lengths, concatenated, with a KV cache."""
    from llminfer.kv import ContiguousKVCache

    path, theirs = random_checkpoint
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32)
    prompts = [torch.randint(0, 101, (n,)) for n in (9, 1, 30)]
    cache = ContiguousKVCache(ours.config, batch_size=3, max_len=32)
    with torch.no_grad():
        flat = ours(torch.cat(prompts), cache, cache.append([len(p) for p in prompts]))
    for prompt, logits in zip(prompts, flat.split([len(p) for p in prompts])):
        assert_close(logits, hf_logits(theirs, prompt[None])[0])
