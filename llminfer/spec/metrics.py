"""How well drafts are accepted: the numbers the speculative-decoding chapter and benchmark report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    num_verifications: int = 0                             # times a request had a draft checked
    num_drafted: int = 0
    num_accepted: int = 0
    reached_at: list[int] = field(default_factory=list)    # [i]: drafts whose token i was checked (all before kept)
    accepted_at: list[int] = field(default_factory=list)   # [i]: ... and kept

    def record(self, drafted: int, accepted: int) -> None:
        """One verification: `drafted` tokens proposed, the first `accepted` of them kept."""
        self.num_verifications += 1
        self.num_drafted += drafted
        self.num_accepted += accepted
        if drafted > len(self.reached_at):
            grow = drafted - len(self.reached_at)
            self.reached_at += [0] * grow
            self.accepted_at += [0] * grow
        for i in range(min(drafted, accepted + 1)):
            self.reached_at[i] += 1
            self.accepted_at[i] += i < accepted

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over drafted tokens."""
        return self.num_accepted / self.num_drafted if self.num_drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens per verification: the accepted drafts plus the verifier's own token."""
        return 1 + self.num_accepted / self.num_verifications if self.num_verifications else None

    def acceptance_by_position(self) -> list[float]:
        """P(draft token i kept | tokens before it kept): the alpha of the classic formula, per position."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached_at, strict=True)]

    def as_dict(self) -> dict:
        return {"verifications": self.num_verifications, "drafted": self.num_drafted, "accepted": self.num_accepted,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
                "acceptance_by_position": self.acceptance_by_position()}
