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


def test_distillation_brings_a_student_closer_to_its_teacher(tmp_path):
    from dataclasses import replace

    import torch.nn.functional as F

    from llminfer.datasets import tinyshakespeare_text, train_val_split

    train("teacher", tmp_path / "teacher", preset=TINY, log=lambda *_: None)
    small = replace(TINY, hidden_size=16, intermediate_size=32, steps=20)
    train("plain", tmp_path / "plain", preset=small, log=lambda *_: None)
    train("student", tmp_path / "student", preset=replace(small, distill_from=str(tmp_path / "teacher"),
                                                             distill_weight=1.0), log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    ids = torch.tensor([tokenizer.encode(train_val_split(tinyshakespeare_text())[1][:400])[:64]])
    load = lambda name: AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()  # noqa: E731
    with torch.no_grad():
        teacher = load("teacher")(ids).logits.log_softmax(-1)[0]
        kl = {name: F.kl_div(load(name)(ids).logits.log_softmax(-1)[0], teacher, log_target=True,
                             reduction="batchmean").item() for name in ("plain", "student")}
    assert kl["student"] < kl["plain"], kl
    assert "Distilled from" in (tmp_path / "student" / "README.md").read_text()
