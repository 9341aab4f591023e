"""Exact enumeration of every random outcome of a computation that draws through a Sampler.

`enumerate_outcomes(fn)` runs `fn(sampler)` once per distinct sequence of random choices, replaying
a prefix of forced choices and branching at the first new one (a depth-first walk of the choice
tree), and returns {outcome: probability}. It tests the real code path: the proposer, verifier and
engine code that runs in production, only with this sampler plugged in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable

import torch


class _ScriptedSampler:
    def __init__(self, forced: list[int]):
        self.forced = forced
        self.position = 0
        self.probability = 1.0
        self.new_branches: list[list[int]] = []
        self._taken: list[int] = []

    def _choose(self, options: list[tuple[int, float]]) -> int:
        if self.position < len(self.forced):
            choice = self.forced[self.position]
        else:
            choice = options[0][0]
            prefix = self.forced + self._taken_after_forced()
            for alt, _ in options[1:]:
                self.new_branches.append(prefix + [alt])
        self._taken.append(choice)
        self.position += 1
        self.probability *= dict(options)[choice]
        return choice

    def _taken_after_forced(self) -> list[int]:
        return self._taken[len(self.forced) :]

    def categorical(self, probs: torch.Tensor) -> int:
        probs = probs.double()
        probs = probs / probs.sum()
        options = [(i, float(p)) for i, p in enumerate(probs.tolist()) if p > 0]
        return self._choose(options)

    def bernoulli(self, p: float) -> bool:
        p = float(p)
        if p >= 1.0:
            return True
        if p <= 0.0:
            return False
        return bool(self._choose([(1, p), (0, 1.0 - p)]))


def enumerate_outcomes(fn: Callable[[object], Hashable], max_runs: int = 200_000) -> dict[Hashable, float]:
    distribution: dict[Hashable, float] = defaultdict(float)
    stack: list[list[int]] = [[]]
    runs = 0
    while stack:
        forced = stack.pop()
        sampler = _ScriptedSampler(forced)
        outcome = fn(sampler)
        distribution[outcome] += sampler.probability
        stack.extend(sampler.new_branches)
        runs += 1
        if runs > max_runs:
            raise RuntimeError(f"more than {max_runs} random paths; use a smaller vocabulary or tree")
    return dict(distribution)
