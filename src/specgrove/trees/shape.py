"""TreeShape: the static shape a tree proposer fills with draft tokens.

A shape is a rooted tree given by `parents` (node i's parent, -1 = the root, parents before
children, nodes in breadth-first order: every node of depth d comes before every node of depth d+1).
The root is the last committed token and is not a node. A node's *rank* is its index among its
siblings in the order they are drawn (rank 0 = first drawn); Sequoia's acceptance vector P[rank]
scores it.

Shapes are written as strings in the API, CLI and bench:

  chain:N        a chain of N nodes (what the draft-model method drafts)
  kary:BxD       the full B-ary tree of depth D (B + B^2 + ... + B^D nodes)
  widths:4,2,1   branching per depth: every node of depth d-1 gets widths[d-1] children
  SPEC@N         any of these cut to its first N nodes in breadth-first order (kary:2x3@8)
  a .json path   a tree written by `specgrove tune` (see specgrove.trees.sequoia)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specgrove.trees.tree import depths_of


@dataclass(frozen=True)
class TreeShape:
    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must come before their children")
        depth = 0
        depths = self.depths()
        for i in range(len(self.parents)):
            if depths[i] < depth:
                raise ValueError("tree shape nodes must be in breadth-first order (depth never decreases)")
            depth = depths[i]

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def chain(cls, length: int) -> TreeShape:
        if length < 0:
            raise ValueError(f"a chain needs length >= 0, got {length}")
        return cls(tuple(range(-1, length - 1)))

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> TreeShape:
        """Every node at depth d-1 (the root at d = 1) gets widths[d-1] children."""
        if any(w < 1 for w in widths):
            raise ValueError(f"branching widths must be >= 1, got {list(widths)}")
        parents: list[int] = []
        level = [-1]
        for width in widths:
            next_level = []
            for node in level:
                for _ in range(width):
                    parents.append(node)
                    next_level.append(len(parents) - 1)
            level = next_level
        return cls(tuple(parents))

    @classmethod
    def kary(cls, branching: int, depth: int) -> TreeShape:
        return cls.from_widths([branching] * depth)

    @classmethod
    def from_nested(cls, children: list) -> TreeShape:
        """From nested lists: each list holds a node's subtrees in rank order; [[[]], []] = the root with
        two children, the first of which has one child."""
        parents: list[int] = []
        queue = [(-1, children)]
        while queue:
            next_queue = []
            for parent, subtrees in queue:
                for sub in subtrees:
                    parents.append(parent)
                    next_queue.append((len(parents) - 1, sub))
            queue = next_queue
        return cls(tuple(parents))

    @classmethod
    def parse(cls, spec: str) -> TreeShape:
        """'chain:5', 'kary:2x3' or 'widths:4,2,1'; 'SPEC@N' keeps the first N nodes in breadth-first order
        (e.g. 'kary:2x3@8': a binary tree cut to 8 nodes, to compare equal budgets). Tree files and Sequoia's
        'sequoia:N:FILE' specs are read by `specgrove.trees.sequoia.parse_tree`, which takes every spec."""
        text = str(spec).strip()
        if text.startswith("sequoia:") or text.endswith(".json"):
            raise ValueError(f"tree spec {spec!r} names a tree file: read it with specgrove.trees.sequoia.parse_tree")
        if "@" in text:
            base, _, count = text.rpartition("@")
            if not count.isdigit():
                raise ValueError(f"bad tree spec {spec!r}: after '@' comes a node count, e.g. kary:2x3@8")
            return cls.parse(base).truncated(int(count))
        kind, _, arg = text.partition(":")
        try:
            if kind == "chain" and arg:
                return cls.chain(int(arg))
            if kind == "kary" and arg:
                branching, _, depth = arg.lower().partition("x")
                return cls.kary(int(branching), int(depth))
            if kind == "widths" and arg:
                return cls.from_widths([int(w) for w in arg.split(",") if w.strip()])
        except ValueError as e:
            raise ValueError(f"bad tree spec {spec!r}: {e}") from None
        raise ValueError(
            f"bad tree spec {spec!r}; use chain:N, kary:BxD, widths:W1,W2,..., sequoia:N:FILE.json or a tree .json file"
        )

    # ---- structure ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.parents)

    def depths(self) -> list[int]:
        return depths_of(self.parents)

    @property
    def depth(self) -> int:
        return max(self.depths(), default=0)

    def is_chain(self) -> bool:
        return list(self.parents) == list(range(-1, len(self) - 1))

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def ranks(self) -> list[int]:
        """Each node's index among its siblings (0 = drawn first)."""
        seen: dict[int, int] = {}
        out = []
        for p in self.parents:
            out.append(seen.get(p, 0))
            seen[p] = out[-1] + 1
        return out

    def levels(self) -> list[list[int]]:
        """Nodes grouped by depth: levels()[d-1] = the nodes of depth d, in order."""
        out: list[list[int]] = []
        for node, depth in enumerate(self.depths()):
            if depth > len(out):
                out.append([])
            out[depth - 1].append(node)
        return out

    def level_sizes(self) -> list[int]:
        """Nodes per depth (what one draft forward per level processes)."""
        return [len(level) for level in self.levels()]

    def truncated(self, max_nodes: int) -> TreeShape:
        """The first `max_nodes` nodes (breadth-first order keeps it a tree)."""
        return TreeShape(self.parents[: max(0, max_nodes)])

    def expected_accept_length(self, acceptance: Sequence[float]) -> float:
        """Sequoia's score: 1 (the root's bonus/correction token) + sum over nodes of the product of
        P[rank] along the path from the root. A rank beyond the vector counts 0."""
        path_prob: list[float] = []
        for p, rank in zip(self.parents, self.ranks()):
            own = acceptance[rank] if rank < len(acceptance) else 0.0
            path_prob.append(own * (1.0 if p < 0 else path_prob[p]))
        return 1.0 + sum(path_prob)

    def describe(self) -> str:
        if self.is_chain():
            return f"chain:{len(self)}"
        return f"{len(self)} nodes, depth {self.depth}, level sizes {','.join(map(str, self.level_sizes()))}"

    def to_dict(self) -> dict:
        return {"parents": list(self.parents), "num_nodes": len(self), "depth": self.depth}
