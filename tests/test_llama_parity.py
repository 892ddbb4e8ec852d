"""llminfer's Llama gives transformers' logits (fp32, 1e-4) on the shipped model and random configs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import assert_close
from llminfer.models.loader import load_checkpoint, load_state_dict, load_weights
from llminfer.models.config import ModelConfig
from llminfer.models.llama import Llama
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


RANDOM_CONFIGS = {
    "gqa-head_dim-48-single-kv-head-tied": dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=1,
                                                 head_dim=48, tie_word_embeddings=True),
    "mha-untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-head_dim-24-not-hidden-over-heads": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                  tie_word_embeddings=False, rope_theta=500000.0),
}


@pytest.fixture(params=sorted(RANDOM_CONFIGS))
def random_checkpoint(request, tmp_path):
    config = LlamaConfig(vocab_size=101, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, **RANDOM_CONFIGS[request.param])
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_random_configs_match_transformers(random_checkpoint):
    path, theirs = random_checkpoint
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32)
    for length in (1, 5, 123):
        ids = torch.randint(0, 101, (3, length))
        assert_close(our_logits(ours, ids), hf_logits(theirs, ids))


def test_unequal_lengths_each_match(random_checkpoint):
    path, theirs = random_checkpoint
    ours = load_checkpoint(path, device="cpu", dtype=torch.float32)
    for length in (2, 17, 64):
        ids = torch.randint(0, 101, (1, length))
        assert_close(our_logits(ours, ids), hf_logits(theirs, ids))


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
