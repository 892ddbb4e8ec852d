"""Answer key for the exercise `spec_verify` (chapter 17, speculative decoding): the verification step.

Rejection sampling: draft d, drawn from q, is kept with probability min(1, p(d) / q(d)); at the first rejection a
replacement is drawn from the residual max(0, p - q), renormalised; if every draft is kept, one more token is drawn
from the target's distribution after them. The tokens that come out are then distributed exactly as p.
"""

import torch


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q): what the target wants more often than the draft proposes (multinomial renormalises it).
    After a rejection q(d) > p(d), so it cannot be all zero except by rounding when p and q are equal;
    then p itself is the right distribution."""
    rest = (p - q).clamp(min=0)   # a new tensor: the inputs are not modified
    return rest if float(rest.sum()) > 0 else p


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_tokens(draft_tokens: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                  generator: torch.Generator) -> list[int]:
    """The accepted draft tokens, then one token drawn by the verifier: 1 to k + 1 token ids."""
    out: list[int] = []
    for i, token in enumerate(draft_tokens):
        p, q = target_probs[i], draft_probs[i]
        p_d, q_d = float(p[token]), float(q[token])
        u = float(torch.rand((), generator=generator))
        # Keep with probability min(1, p_d / q_d): u < p_d / q_d, written without dividing (q_d may be tiny).
        if u * q_d < p_d:
            out.append(int(token))
            continue
        out.append(_draw(_residual(p, q), generator))   # the replacement ends this verification
        return out
    out.append(_draw(target_probs[len(draft_tokens)], generator))   # every draft kept: a bonus token from p[k]
    return out
