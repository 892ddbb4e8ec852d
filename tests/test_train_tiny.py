"""The training script, on a few steps of a tiny config: it learns, it is deterministic, its output loads."""

import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llminfer.models.train_tiny import Preset, train

TINY = Preset(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              tie_word_embeddings=True, steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup=3, eval_every=10,
              vocab_size=300, max_position_embeddings=64)


def test_training_learns_deterministically_and_saves_hf_format(tmp_path):
    a = train("tiny-test", tmp_path / "a", preset=TINY, log=lambda *_: None)
    train("tiny-test", tmp_path / "b", preset=TINY, log=lambda *_: None)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    losses = [h["val_loss_per_token"] for h in a["history"]]
    assert losses[-1] < math.log(TINY.vocab_size) - 1.0, losses   # well below a uniform guess: it learns
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert len(tokenizer) == 300 and model.config.num_key_value_heads == 2
    saved = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    assert saved["val_nats_per_char"] == a["val_nats_per_char"]
    assert "nats per character" in (tmp_path / "a" / "README.md").read_text()
