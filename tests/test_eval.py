"""nats per character: each token scored exactly once, and equal to transformers' own loss."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llminfer.eval import nats_per_char, perplexity, total_nats
from llminfer.models.registry import SHIPPED


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


@pytest.mark.parametrize("n, context", [(1, 4), (10, 4), (11, 11), (100, 7), (37, 512)])
def test_every_token_is_scored_once(n, context):
    # A uniform model pays log(vocab) per predicted token: the total counts the predictions.
    nats = total_nats(Uniform(13), [i % 13 for i in range(n)], bos_token_id=0, context=context, batch_size=3)
    assert nats == pytest.approx(n * math.log(13))


def test_single_window_equals_transformers_loss():
    path = SHIPPED["tiny-shakespeare-draft"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "KING RICHARD II:\nNo matter where; of comfort no man speak:\nLet's talk of graves, of worms."
    ids = tokenizer.encode(text)
    with torch.no_grad():
        hf_loss = model(input_ids=torch.tensor([[tokenizer.bos_token_id] + ids]),
                        labels=torch.tensor([[tokenizer.bos_token_id] + ids])).loss.item()
    assert nats_per_char(model, tokenizer, text) == pytest.approx(hf_loss * len(ids) / len(text), rel=1e-5)


def test_perplexity_is_exp_of_transformers_loss():
    path = SHIPPED["tiny-shakespeare-draft"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "DUKE VINCENTIO:\nBe absolute for death; either death or life\nShall thereby be the sweeter."
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text)])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(model, tokenizer, text) == pytest.approx(math.exp(loss), rel=1e-5)
