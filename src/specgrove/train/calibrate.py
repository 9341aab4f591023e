"""Choosing a sorted draft's exit thresholds by measurement (`specgrove calibrate-sorted`).

Adaptive drafting (specgrove.drafting.sorted) stops at exit l when that exit's confidence (largest softmax
probability at temperature 1) reaches threshold t_l. Stopping early is worth it when the early exit is as
good as running on: so, teacher-forced over target text (distillation samples: the target's own greedy
continuations), for every exit and continuation position we record the confidence and whether the
exit's top token is the target's next token, and choose

    t_l = the smallest t on a grid (0, 0.05, ..., 1) such that, among the positions where exit l's confidence
          is >= t, its top token agrees with the target at least as often as the deepest exit does overall;

1.0 (never stop there) when no t qualifies; the deepest exit's threshold is 0 (it always emits). The
agreement rate is the greedy acceptance of a draft token, so a token taken early is as likely to be
accepted as one from the whole draft, at a fraction of the cost.

Also recorded, for reading rather than for the rule: whether the target's token is among the exit's top-n
tokens (the greedy acceptance of the first level of a token tree whose root has n children, as
`bench --methods sorted@L:widths:n` drafts), and both rates per target, since one sorted draft serves
several targets and agrees with each differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specgrove.drafting.sorted import LayeredCache

GRID = [round(0.05 * i, 2) for i in range(21)]


@dataclass
class ExitStatistics:
    exit_layer: int
    confidence: torch.Tensor  # [N] over continuation positions
    agrees: torch.Tensor  # [N] bool: the exit's top token is the target's next token
    in_top: torch.Tensor | None = None  # [N] bool: the target's next token is among the exit's top-n
    target_index: torch.Tensor | None = None  # [N] the position's target, an index into target_names
    target_names: tuple[str, ...] = ()

    @property
    def agreement(self) -> float:
        return float(self.agrees.float().mean()) if len(self.agrees) else 0.0

    def precision_at(self, threshold: float) -> tuple[float, float]:
        """(agreement where confidence >= threshold, share of positions that reach it)."""
        chosen = self.confidence >= threshold
        share = float(chosen.float().mean()) if len(chosen) else 0.0
        return (float(self.agrees[chosen].float().mean()) if bool(chosen.any()) else 0.0), share

    def in_top_rate(self) -> float | None:
        return float(self.in_top.float().mean()) if self.in_top is not None and len(self.in_top) else None

    def for_target(self, name: str) -> ExitStatistics:
        """These statistics over the positions of one target's samples."""
        rows = self.target_index == self.target_names.index(name)
        in_top = None if self.in_top is None else self.in_top[rows]
        return ExitStatistics(
            self.exit_layer,
            self.confidence[rows],
            self.agrees[rows],
            in_top,
            self.target_index[rows],
            self.target_names,
        )

    def by_target(self) -> dict[str, tuple[float, float | None, int]]:
        """target -> (agreement, in-top-n rate, positions) over that target's positions."""
        out = {}
        for index, name in enumerate(self.target_names):
            rows = self.target_index == index
            n = int(rows.sum())
            if n:
                out[name] = (
                    float(self.agrees[rows].float().mean()),
                    None if self.in_top is None else float(self.in_top[rows].float().mean()),
                    n,
                )
        return out


@torch.inference_mode()
def exit_statistics(
    draft, samples: Sequence, exits: Sequence[int], limit: int | None = None, top_n: int = 4
) -> list[ExitStatistics]:
    """Teacher-forced confidence, agreement and top-`top_n` hits of every exit over the samples'
    continuations, each position labelled with its sample's target."""
    model = draft.model
    conf = {e: [] for e in exits}
    agree = {e: [] for e in exits}
    in_top = {e: [] for e in exits}
    names: dict[str, int] = {}
    index = []
    for sample in list(samples)[:limit]:
        ids = list(sample.prompt_ids) + list(sample.output_ids)
        if not sample.output_ids or len(ids) < 2:
            continue
        start = len(sample.prompt_ids) - 1  # logits at position i predict token i + 1
        nxt = torch.tensor(ids[start + 1 :], device=model.device)
        index.append(torch.full((len(nxt),), names.setdefault(sample.target or "", len(names))))
        cache = LayeredCache(model, len(ids))  # every position computed layer by layer, one causal chunk each
        cache.append(ids)
        for e in exits:
            cache.run_to(e)
            probs = torch.softmax(model.logits(cache.hidden[start : len(ids) - 1]), -1)
            top, arg = probs.max(-1)
            conf[e].append(top.cpu())
            agree[e].append((arg == nxt).cpu())
            in_top[e].append((probs.topk(min(top_n, probs.shape[-1]), -1).indices == nxt[:, None]).any(-1).cpu())
    if not conf[exits[0]]:
        raise ValueError("no sample has a continuation to calibrate on")
    target_index = torch.cat(index)
    return [
        ExitStatistics(e, torch.cat(conf[e]), torch.cat(agree[e]), torch.cat(in_top[e]), target_index, tuple(names))
        for e in exits
    ]


def choose_thresholds(stats: Sequence[ExitStatistics]) -> list[float]:
    """The module docstring's rule: per exit the smallest grid threshold whose precision reaches the deepest
    exit's overall agreement (1.0 if none does); 0 for the deepest exit."""
    goal = stats[-1].agreement
    thresholds = []
    for s in stats[:-1]:
        chosen = next((t for t in GRID if s.precision_at(t)[0] >= goal and s.precision_at(t)[1] > 0), 1.0)
        thresholds.append(chosen)
    return thresholds + [0.0]


def choose_target_thresholds(stats: Sequence[ExitStatistics]) -> dict[str, list[float]]:
    """`choose_thresholds` over each target's positions alone, for samples of several targets ({} for one)."""
    names = [n for n in stats[0].target_names if n]
    if len(names) < 2:
        return {}
    return {name: choose_thresholds([s.for_target(name) for s in stats]) for name in names}
