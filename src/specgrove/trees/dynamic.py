"""EAGLE-2's dynamic token tree (Li et al. 2024) as a plan: how many nodes, how deep, how wide each level
expands. `specgrove.drafting.eagle` grows the tree from a draft head's outputs; the method language spells it
`eagle:dynamic:N[,D,K]` (and `eagle:mixed:...` with a prompt-lookup branch)."""

from __future__ import annotations

from dataclasses import dataclass

from specgrove.trees.shape import TreeShape


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's dynamic tree: `nodes` tokens in all, `depth` levels, `top_k` nodes expanded per level with
    `top_k` children each; `lookup`: a prompt-lookup branch of up to `lookup` tokens besides (the mixed tree)."""

    nodes: int
    depth: int
    top_k: int
    lookup: int = 0

    def __post_init__(self):
        if self.nodes < 1 or self.depth < 1 or self.top_k < 1 or self.lookup < 0:
            raise ValueError(f"a dynamic tree needs nodes, depth, top_k >= 1 and lookup >= 0, got {self}")

    @property
    def max_nodes(self) -> int:
        return self.nodes

    @classmethod
    def parse(cls, spec: str) -> DynamicTree:
        """'dynamic:N' / 'dynamic:N,D,K' (nodes, depth, top-k), or 'mixed:...' (the same plus a prompt-lookup
        branch of up to N // 2 tokens). Defaults: D = min(N, 6), K = 4."""
        kind, _, rest = spec.partition(":")
        if kind not in ("dynamic", "mixed"):
            raise ValueError(f"{spec!r} is not a dynamic tree: use dynamic:N[,D,K] or mixed:N[,D,K]")
        parts = rest.split(",") if rest else []
        if len(parts) not in (1, 3) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(
                f"{spec!r}: give the tree's size, or size, depth and top-k, e.g. {kind}:12 or {kind}:12,5,4"
            )
        nodes = int(parts[0])
        depth, top_k = (int(parts[1]), int(parts[2])) if len(parts) == 3 else (min(nodes, 6), 4)
        return cls(nodes, depth, top_k, nodes // 2 if kind == "mixed" else 0)

    def shape(self) -> TreeShape:
        """A static shape of the same size, the speculation policy's estimate of this tree: `top_k` chains of
        `depth` from the root, cut to `nodes` in breadth-first order."""
        return TreeShape.from_widths([self.top_k] + [1] * (self.depth - 1)).truncated(self.nodes)


def is_dynamic(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.split(":", 1)[0] in ("dynamic", "mixed")
