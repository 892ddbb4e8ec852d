"""Figures the chapters draw from live model and engine state."""

from llminfer.viz.tokens import plot_top_tokens, token_label

__all__ = ["plot_top_tokens", "token_label"]
