"""Speculation metrics, defined once.

target_forwards       target forward passes in the decode phase (one per speculative step)
prefill_forwards      forward passes of the prompt prefill (the target's chunks, and a draft model's)
draft_forwards        draft model forward passes this sequence took part in while drafting (draft-model proposers)
proposed_per_step[s]  draft tokens proposed at step s (tree nodes; 0 for a plain step)
accepted_per_step[s]  draft tokens the verifier accepted at step s
mean_accept_length    tau = mean over steps of (accepted + 1): the bonus/correction token counts
acceptance_rate       sum(accepted) / sum(proposed)
per_position_acceptance[i]  accepted at depth i+1 / steps that proposed a token at depth i+1
rank_acceptance[r]    Sequoia's online acceptance vector: verified tree nodes whose child of rank r
                      (r-th drawn sibling) was the accepted one / verified nodes that had an r-th child
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _add_counts(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two count lists of possibly different lengths."""
    n = max(len(a), len(b))
    return [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]


@dataclass
class SpecMetrics:
    target_forwards: int = 0
    prefill_forwards: int = 0
    draft_forwards: int = 0
    proposed_per_step: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)
    position_proposed: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    rank_trials: list[int] = field(default_factory=list)
    rank_accepted: list[int] = field(default_factory=list)
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    verify_time_s: float = 0.0
    prefill_time_s: float = 0.0
    total_time_s: float = 0.0
    generated_tokens: int = 0
    last_depth: int = 0  # depth of the last step's proposal (the goodput policy's acceptance estimate)

    def record_step(
        self, depth_proposed: int, num_proposed: int, num_accepted: int, decisions: list[tuple[int, int]] = ()
    ) -> None:
        """One step: a tree of `num_proposed` nodes reaching depth `depth_proposed`, `num_accepted` accepted;
        `decisions`: (children, accepted rank or -1) at each verified node (VerifyResult.decisions)."""
        for num_children, rank in decisions:
            while len(self.rank_trials) < num_children:
                self.rank_trials.append(0)
                self.rank_accepted.append(0)
            for r in range(num_children):
                self.rank_trials[r] += 1
            if rank >= 0:
                self.rank_accepted[rank] += 1
        self.target_forwards += 1
        self.last_depth = depth_proposed
        self.proposed_per_step.append(num_proposed)
        self.accepted_per_step.append(num_accepted)
        while len(self.position_proposed) < depth_proposed:
            self.position_proposed.append(0)
            self.position_accepted.append(0)
        for i in range(depth_proposed):
            self.position_proposed[i] += 1
        for i in range(num_accepted):
            self.position_accepted[i] += 1

    @property
    def mean_accept_length(self) -> float:
        steps = len(self.accepted_per_step)
        return (sum(self.accepted_per_step) + steps) / steps if steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        proposed = sum(self.proposed_per_step)
        return sum(self.accepted_per_step) / proposed if proposed else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.position_accepted, self.position_proposed)]

    @property
    def rank_acceptance(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.rank_accepted, self.rank_trials)]

    @property
    def decode_time_s(self) -> float:
        return self.total_time_s - self.prefill_time_s

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_time_s if self.total_time_s > 0 else 0.0

    def merge(self, other: SpecMetrics) -> SpecMetrics:
        out = SpecMetrics()
        for name in (
            "target_forwards",
            "prefill_forwards",
            "draft_forwards",
            "draft_time_s",
            "target_time_s",
            "verify_time_s",
            "prefill_time_s",
            "total_time_s",
            "generated_tokens",
        ):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.proposed_per_step = self.proposed_per_step + other.proposed_per_step
        out.accepted_per_step = self.accepted_per_step + other.accepted_per_step
        for name in ("position_proposed", "position_accepted", "rank_trials", "rank_accepted"):
            setattr(out, name, _add_counts(getattr(self, name), getattr(other, name)))
        return out

    def to_dict(self) -> dict:
        return {
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "generated_tokens": self.generated_tokens,
            "accepted_per_step": self.accepted_per_step,
            "proposed_per_step": self.proposed_per_step,
            "mean_accept_length": self.mean_accept_length,
            "acceptance_rate": self.acceptance_rate,
            "per_position_acceptance": self.per_position_acceptance,
            "rank_acceptance": self.rank_acceptance,
            "draft_time_s": self.draft_time_s,
            "target_time_s": self.target_time_s,
            "verify_time_s": self.verify_time_s,
            "prefill_time_s": self.prefill_time_s,
            "total_time_s": self.total_time_s,
            "tokens_per_s": self.tokens_per_s,
        }
