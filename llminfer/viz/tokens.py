"""Figures about tokens and next-token distributions."""

from __future__ import annotations

import torch


def token_label(tokenizer, token_id: int) -> str:
    """A token as readable text: spaces shown as '·', newlines as '\\n'."""
    return repr(tokenizer.decode([token_id]))[1:-1].replace(" ", "·") or "∅"


def plot_top_tokens(ax, probs: torch.Tensor, tokenizer, k: int = 15, title: str = "") -> None:
    """Bar chart of the k most likely next tokens of a probability vector [vocab]."""
    values, ids = torch.topk(probs.float(), k)
    labels = [token_label(tokenizer, int(i)) for i in ids]
    bars = ax.bar(range(k), values.tolist(), color="#4C72B0")
    for bar, v in zip(bars, values.tolist(), strict=True):
        if v == 0:
            bar.set_color("#cccccc")
    ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=8, family="monospace")
    ax.set_ylabel("probability")
    kept = int((probs > 0).sum())
    ax.set_title(f"{title}  ({kept} tokens kept)" if title else f"{kept} tokens with p > 0", fontsize=10)
