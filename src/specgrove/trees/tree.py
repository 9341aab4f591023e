"""TokenTree: what every proposer returns and the target verifies in one forward pass.

Nodes 0..N-1 hold draft tokens; node i's parent is `parents[i]` (-1 = the root, which is the last
committed token whose KV is not yet in the target cache). Parents come before children. A chain is a
tree with one child per node; a multi-draft step is a root with several children.

`draft_probs[i]` is the distribution node i was drawn from (q, after removing earlier siblings when
children are drawn without replacement). None means the proposer is deterministic (prompt lookup,
greedy drafting): q is then the point mass on the token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def path_to(node: int, parent) -> list[int]:
    """The nodes from the root (excluded) to `node` (included; -1: the root, no nodes), `parent(n)` giving each
    node's parent (-1 for the root's children): TokenTree's, and a proposer's tree while it is drafted."""
    path = []
    while node >= 0:
        path.append(node)
        node = parent(node)
    return path[::-1]


def depths_of(parents) -> list[int]:
    """Depth of each node of a parents list (parents before children; the root's children: depth 1)."""
    d: list[int] = []
    for p in parents:
        d.append(1 if p < 0 else d[p] + 1)
    return d


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [N, V] fp32 or None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a TokenTree needs one parent per token")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come before their children")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.tokens):
            raise ValueError("draft_probs needs one row per node")

    @classmethod
    def chain(cls, tokens: list[int], draft_probs: torch.Tensor | None = None) -> TokenTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), draft_probs)

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of each node (root's children have depth 1)."""
        return depths_of(self.parents)

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1 = root), in the order they were drawn."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    def attention_mask(self) -> torch.Tensor:
        """[N+1, N+1] bool over root + nodes: entry (i, j) is True iff j is i or an ancestor of i."""
        n = len(self.tokens) + 1
        mask = torch.eye(n, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i + 1] |= mask[p + 1]
        return mask

    def position_offsets(self) -> list[int]:
        """Position of root + nodes relative to the root."""
        return [0] + self.depths()

    def path_to(self, node: int) -> list[int]:
        return path_to(node, self.parents.__getitem__)
