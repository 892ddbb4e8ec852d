"""Small models and inputs shared by the quantization tests."""

import torch

from llminfer.models.config import ModelConfig
from llminfer.models.llama import Llama, RMSNorm


def small_llama(num_kv_heads: int = 2, qkv_bias: bool = False, seed: int = 0) -> Llama:
    """A 2-layer Llama (hidden 64, 4 heads of 16, intermediate 128) with random norm weights, so that
    folding a scale into a norm is visible; num_kv_heads=4 has no grouped-query attention."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_ids=(0,), qkv_bias=qkv_bias)
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
    return model.eval()


def outlier_inputs(tokens: int, features: int, channels: int = 4, size: float = 30.0,
                   seed: int = 0) -> torch.Tensor:
    """Activations whose few `channels` (the same ones for every seed) are `size` times larger than the rest,
    as LLM activations are."""
    x = torch.randn(tokens, features, generator=torch.Generator().manual_seed(seed))
    x[:, torch.arange(channels) * (features // channels)] *= size
    return x
