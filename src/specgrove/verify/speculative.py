"""Verification of a token tree against the target: pure functions on probability tensors.

A step walks the tree from the root. At each node the target distribution p (processed exactly as
the draft's q was) decides among the node's children, in the order they were drawn:

  recursive rejection sampling (Leviathan et al. 2023; SpecInfer's multi-child form; Sequoia Alg. 2):
    child x drawn from q_x is accepted with probability min(1, p(x) / q_x(x));
    on rejection p <- normalize(max(0, p - q_x)) and the next child is tried.
  If a child is accepted the walk moves to it with the target's p at that node; if every child is
  rejected, or the node is a leaf, one more token is sampled from the current p (the correction or
  bonus token).

Each child's q is the distribution it was really drawn from (TokenTree.draft_probs): for one child
this is standard speculative sampling; for i.i.d. children it is SpecInfer's RRS; for children drawn
without replacement (each q with the earlier siblings removed) it is Sequoia's verification. A
deterministic proposer has q = the point mass on its token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specgrove.trees.tree import TokenTree


@dataclass
class VerifyResult:
    accepted_nodes: list[int]  # tree node indices of the accepted path, root excluded
    next_token: int  # correction / bonus token sampled from the target
    # One entry per node where children were tried: (number of children, rank of the accepted child or
    # -1). The online acceptance vector (Sequoia's P[rank]) is counted from these.
    decisions: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)). If nothing is left (p <= q everywhere, which only rounding can make
    reachable) the target distribution itself is returned, never NaN and never an empty support."""
    residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    if not torch.isfinite(total) or total <= 1e-12:
        return p
    return residual / total


def rejection_select(
    p: torch.Tensor, child_tokens: Sequence[int], child_draft_probs: Sequence[torch.Tensor | None], sampler
) -> tuple[int | None, torch.Tensor]:
    """Recursive rejection sampling over one node's children. Returns (accepted child position or None,
    the target distribution left to sample from if none was accepted)."""
    for position, (token, q) in enumerate(zip(child_tokens, child_draft_probs)):
        if q is None:  # deterministic proposal: q is the point mass on `token`
            if sampler.bernoulli(float(p[token])):
                return position, p
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q_token = float(q[token])
            if q_token <= 0.0:
                raise ValueError(f"draft token {token} has probability 0 under the q it was said to be drawn from")
            if sampler.bernoulli(min(1.0, float(p[token]) / q_token)):
                return position, p
        p = residual_distribution(p, q)
    return None, p


NodeRule = Callable[
    [torch.Tensor, Sequence[int], Sequence["torch.Tensor | None"], object], tuple["int | None", torch.Tensor]
]


def verify_tree(
    tree: TokenTree, target_probs: torch.Tensor, sampler, node_rule: NodeRule = rejection_select
) -> VerifyResult:
    """Walk `tree` with the target distributions `target_probs` [N+1, V] (row 0 = root, row i+1 = node i; any
    object indexable by row, e.g. `specgrove.sampling.ProcessedRows`, which processes only the rows visited)."""
    accepted: list[int] = []
    decisions: list[tuple[int, int]] = []
    node = -1
    while True:
        p = target_probs[node + 1]
        children = tree.children(node)
        if not children:
            return VerifyResult(accepted, sampler.categorical(p), decisions)
        qs = [None if tree.draft_probs is None else tree.draft_probs[c] for c in children]
        chosen, residual = node_rule(p, [tree.tokens[c] for c in children], qs, sampler)
        decisions.append((len(children), -1 if chosen is None else chosen))
        if chosen is None:
            return VerifyResult(accepted, sampler.categorical(residual), decisions)
        node = children[chosen]
        accepted.append(node)


def verify_tree_greedy(tree: TokenTree, target_argmax: Sequence[int]) -> VerifyResult:
    """Greedy verification: follow the child equal to the target's argmax; emit the argmax where none is."""
    accepted: list[int] = []
    decisions: list[tuple[int, int]] = []
    node = -1
    while True:
        best = int(target_argmax[node + 1])
        children = tree.children(node)
        rank = next((r for r, c in enumerate(children) if tree.tokens[c] == best), -1)
        if children:
            decisions.append((len(children), rank))
        if rank < 0:
            return VerifyResult(accepted, best, decisions)
        node = children[rank]
        accepted.append(node)
