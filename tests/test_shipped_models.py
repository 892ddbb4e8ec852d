"""The shipped models: HF format, loadable offline by transformers, and as good as their cards say."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llminfer.datasets import tinyshakespeare_text, train_val_split
from llminfer.eval import nats_per_char
from llminfer.models.registry import ASSETS, SHIPPED
from llminfer.models.train_tiny import flops_per_token

TARGETS = {"tiny-shakespeare": 1.80, "tiny-shakespeare-draft": 2.20}


def summary(name: str) -> dict:
    return json.loads((SHIPPED[name] / "training_summary.json").read_text())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_files_are_in_hugging_face_format(name):
    files = {p.name for p in SHIPPED[name].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= files
    config = json.loads((SHIPPED[name] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_attention_heads"] > config["num_key_value_heads"]  # grouped-query attention
    assert config["max_position_embeddings"] >= 512
    assert config["dtype"] in ("bfloat16", "float16")


def test_assets_fit_the_size_budget():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 25 * 2**20, f"shipped assets are {total / 2**20:.1f} MiB"


def test_both_models_share_one_tokenizer():
    main, draft = (SHIPPED[n] / "tokenizer.json" for n in ("tiny-shakespeare", "tiny-shakespeare-draft"))
    assert main.read_bytes() == draft.read_bytes()


def test_sizes_and_draft_cost():
    from transformers import AutoConfig

    main = AutoConfig.from_pretrained(SHIPPED["tiny-shakespeare"])
    draft = AutoConfig.from_pretrained(SHIPPED["tiny-shakespeare-draft"])
    assert 4e6 <= summary("tiny-shakespeare")["parameters"] <= 8e6
    assert 1900 <= main.vocab_size <= 2200
    for context in (0, 512, 1024):
        assert flops_per_token(main, context) >= 4 * flops_per_token(draft, context)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_card_reports_the_summary(name):
    s = summary(name)
    card = (SHIPPED[name] / "README.md").read_text()
    assert f"{s['val_nats_per_char']:.4f} nats per character" in card
    assert s["command"] in card and "90%" in card and f"{s['parameters']:,}" in card
    assert s["val_nats_per_char"] <= TARGETS[name]


@pytest.fixture(scope="module")
def recomputed_loss() -> dict[str, float]:
    """Each shipped model's validation loss, recomputed here with transformers (not read from its card)."""
    _, val_text = train_val_split(tinyshakespeare_text())
    losses = {}
    for name in sorted(SHIPPED):
        model = AutoModelForCausalLM.from_pretrained(SHIPPED[name], dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(SHIPPED[name])
        losses[name] = nats_per_char(model, tokenizer, val_text, context=summary(name)["preset"]["seq_len"])
    return losses


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_validation_loss_recomputed_with_transformers_matches_the_card(name, recomputed_loss):
    loss = recomputed_loss[name]
    card = float(re.search(r"\*\*([0-9.]+) nats per character", (SHIPPED[name] / "README.md").read_text())[1])
    assert abs(loss - card) <= 0.02 * card, f"recomputed {loss:.4f} nats/char, card says {card}"
    assert loss <= TARGETS[name]


def test_the_main_model_is_clearly_better_than_its_draft(recomputed_loss):
    main, draft = recomputed_loss["tiny-shakespeare"], recomputed_loss["tiny-shakespeare-draft"]
    assert main < draft - 0.02, f"main {main:.4f} nats/char, draft {draft:.4f}: a draft should not be as good"
