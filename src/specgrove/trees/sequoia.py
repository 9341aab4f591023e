"""Sequoia (Chen et al., 2024): acceptance vectors, the optimal-tree dynamic program, and the
hardware-aware choice of tree size.

Paper symbols, and how they map here (the paper counts from 1, this file from 0):

  P[k]        the acceptance vector: the probability that the k-th sibling, in the order the siblings
              were drawn from the draft without replacement, is the one the target accepts.
              Here `values[k]`, k = 0..W-1; rank 0 = the first drawn sibling = the paper's P[1].
  W           the width the vector was measured at (how many siblings were drawn).
  p, q        the target's and the draft's processed distributions (`process_logits`, same params).
  p_res, q_j  the target residual and the j-th sibling's draft distribution during verification.
  T[n][d][b]  the DP table: the best expected number of tokens per step of a tree with n nodes
              (counting the root), depth <= d, whose root has exactly b children.
  F(tree)     a tree's score (expected accepted length, bonus included):
              1 + sum over nodes of the product of P[rank] along the path from the root.
  t(n)        the target's forward time for n new tokens; the draft runs one forward per tree level.

What `specgrove tune` does with this file, top to bottom:
  1. measure P: `measure_acceptance_offline` (teacher-forced text) or `acceptance_from_counts` (live);
  2. score every (node budget, depth) in one DP run: `optimal_scores` / `optimal_tree`;
  3. pick the size the hardware rewards: `HardwareProfile`, `choose_tree`, `best_choice`;
  4. write the tree: `tree_file_dict` -> JSON; `parse_tree` / `load_tree_file` read it back.

Budgets: in this project "a budget of n nodes" counts DRAFT nodes. The DP counts the root too, so a
budget of n is the DP's n + 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specgrove.trees.shape import TreeShape
from specgrove.verify.speculative import residual_distribution

# =====================================================================================================
# 1. The acceptance vector P
# =====================================================================================================

_SUM_SLACK = 1e-6  # rounding allowed above 1 in values and in their sum
_SOURCES = ("offline", "online")


@dataclass
class AcceptanceVector:
    """P[k] for k = 0..W-1 (rank 0 = the first drawn sibling), and the sampling settings it was
    measured under: P depends on the processed p and q, so it only fits the same settings."""

    values: list[float]
    temperature: float
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    source: str = "offline"  # "offline" (teacher-forced text) or "online" (live decoding counts)
    num_positions: int = 0  # positions (offline) or verified nodes (online) it was averaged over
    min_p: float = 0.0  # also changes p and q; 0 = disabled

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid acceptance vector: {msg}")

        if isinstance(self.values, (str, bytes)) or not isinstance(self.values, Iterable):
            raise bad(f"values must be a list of numbers, got {self.values!r}")
        values = list(self.values)
        if not values:
            raise bad("values is empty; it needs P[k] for at least one sibling rank")
        clean = []
        for k, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(f"values[{k}] must be a finite number, got {v!r}")
            if not 0.0 <= v <= 1.0 + _SUM_SLACK:
                raise bad(f"values[{k}] = {v} is not a probability in [0, 1]")
            clean.append(min(1.0, float(v)))
        if sum(clean) > 1.0 + _SUM_SLACK:
            raise bad(f"the values sum to {sum(clean):.6f} > 1; P[k] are the probabilities of disjoint events")
        self.values = clean
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad(f"temperature must be a number, got {self.temperature!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be an integer >= 1, or 0 / -1 to disable it; got {self.top_k!r}")
        if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.source not in _SOURCES:
            raise bad(f"source must be one of {_SOURCES}, got {self.source!r}")
        if isinstance(self.num_positions, bool) or not isinstance(self.num_positions, int) or self.num_positions < 0:
            raise bad(f"num_positions must be an integer >= 0, got {self.num_positions!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)

    @property
    def width(self) -> int:
        return len(self.values)

    def to_dict(self) -> dict:
        return {
            "values": list(self.values),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "source": self.source,
            "num_positions": self.num_positions,
        }

    @classmethod
    def from_dict(cls, d: dict) -> AcceptanceVector:
        if not isinstance(d, dict):
            raise ValueError(f"an acceptance vector must be a JSON object, got {type(d).__name__}")
        allowed = {"values", "temperature", "top_p", "top_k", "min_p", "source", "num_positions"}
        for key in ("values", "temperature"):
            if key not in d:
                raise ValueError(f"acceptance vector is missing {key!r} (it has {sorted(d)})")
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"acceptance vector has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)

    def matches(self, params) -> bool:
        """Whether SamplingParams `params` process p and q the way they were processed when P was
        measured. Greedy (temperature 0) matches greedy whatever top_p / top_k say: greedy ignores them."""
        if self.temperature == 0 or params.temperature == 0:
            return self.temperature == 0 and params.temperature == 0

        def top_k(k: int) -> int:
            return 0 if k <= 0 else k

        return (
            math.isclose(self.temperature, params.temperature, rel_tol=1e-9, abs_tol=1e-12)
            and math.isclose(self.top_p, params.top_p, rel_tol=1e-9, abs_tol=1e-12)
            and top_k(self.top_k) == top_k(params.top_k)
            and math.isclose(self.min_p, getattr(params, "min_p", 0.0), rel_tol=1e-9, abs_tol=1e-12)
        )


# =====================================================================================================
# 2. Drawing siblings without replacement, and the exact acceptance of each sibling
# =====================================================================================================


def draw_without_replacement(q: torch.Tensor, width: int, generator: torch.Generator) -> list[int]:
    """Draw up to `width` distinct tokens from q in order, as sequential sampling without replacement
    does: the exponential race (Gumbel top-n). Key(x) = log(u_x) / q(x), u ~ U(0, 1); the tokens with
    the largest keys, largest first, are the draws. Fewer than `width` if q has fewer nonzero tokens."""
    if q.dim() != 1:
        raise ValueError(f"q must be a 1-D distribution over the vocabulary, got shape {tuple(q.shape)}")
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    q = q.detach().to(device=generator.device, dtype=torch.float64)
    support = q > 0
    count = min(width, int(support.sum()))
    if count == 0:
        return []
    u = torch.rand(q.shape, generator=generator, dtype=torch.float64, device=generator.device)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)  # log(0) would tie a drawable token with the excluded ones
    keys = torch.where(support, torch.log(u) / q.clamp_min(torch.finfo(torch.float64).tiny), -math.inf)
    return [int(i) for i in torch.topk(keys, count).indices.tolist()]


def sibling_acceptance(p: torch.Tensor, q: torch.Tensor, drawn: Sequence[int]) -> list[float]:
    """acc_j = P(sibling j is the accepted one) under Sequoia's verification without replacement,
    exactly (no sampling), for siblings `drawn` drawn from q in this order without replacement.

      q_0 = q;  p_res = p
      sibling j, drawn from q_j, is accepted w.p. a_j = min(1, p_res(x_j) / q_j(x_j))
      acc_j = prod_{i<j} (1 - a_i) * a_j
      on rejection: p_res <- normalize(max(0, p_res - q_j))       (residual_distribution)
                    q_{j+1} = q_j with x_j set to 0, renormalised
    Once q_j has no mass left there is nothing to draw: the remaining entries are 0."""
    if p.dim() != 1 or q.shape != p.shape:
        raise ValueError(f"p and q must be 1-D over the same vocabulary, got {tuple(p.shape)} and {tuple(q.shape)}")
    p_res = p.detach().to(torch.float64)
    q_j = q.detach().to(device=p_res.device, dtype=torch.float64)
    mass = float(q_j.sum())
    out: list[float] = []
    undecided = 1.0  # prod_{i<j} (1 - a_i): no earlier sibling was accepted
    for j, x in enumerate(drawn):
        if mass <= 0.0:
            out.append(0.0)
            continue
        q_j = q_j / mass
        q_x = float(q_j[x])
        if q_x <= 0.0:
            raise ValueError(f"sibling {j} (token {x}) has probability 0 under q_{j}: it cannot have been drawn")
        a_j = min(1.0, float(p_res[x]) / q_x)
        out.append(undecided * a_j)
        undecided *= 1.0 - a_j
        p_res = residual_distribution(p_res, q_j)
        q_j = q_j.clone()
        q_j[x] = 0.0
        mass = float(q_j.sum())
    return out


def sibling_acceptance_greedy(target_argmax: int, drawn: Sequence[int]) -> list[float]:
    """Greedy verification follows the child equal to the target's argmax: indicator per sibling."""
    out = [0.0] * len(drawn)
    for j, x in enumerate(drawn):
        if int(x) == int(target_argmax):
            out[j] = 1.0
            break
    return out


# =====================================================================================================
# 3. Measuring P: offline (teacher-forced) and online (counts from live decoding)
# =====================================================================================================


def _greedy_siblings(scores: torch.Tensor, width: int) -> list[int]:
    """Greedy drafting's siblings: the top-`width` tokens by draft score, ties to the lower id."""
    order = torch.sort(scores.detach().to(torch.float64), descending=True, stable=True).indices
    return [int(i) for i in order[:width].tolist()]


def measure_acceptance_offline(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    width: int,
    generator: torch.Generator,
    greedy: bool = False,
    params=None,
) -> AcceptanceVector:
    """P[k] averaged over N teacher-forced positions: rows [N, V] of the processed p and q at the same
    positions. Sampling: per row draw `width` siblings from q without replacement and add their exact
    `sibling_acceptance`. Greedy: the siblings are the top-`width` tokens of q (pass the draft's soft
    distribution here: the processed greedy q is one-hot), and the one equal to argmax p is accepted.
    `params` (SamplingParams) labels the vector; without it: temperature 1 (or 0 when greedy)."""
    if target_probs.dim() != 2 or draft_probs.shape != target_probs.shape:
        raise ValueError(
            f"target_probs and draft_probs must both be [N, V], got {tuple(target_probs.shape)} and "
            f"{tuple(draft_probs.shape)}"
        )
    rows = target_probs.shape[0]
    if rows == 0:
        raise ValueError("no positions to measure acceptance at (N = 0)")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if params is not None and params.greedy and not greedy:
        greedy = True
    if params is not None and greedy and not params.greedy:
        raise ValueError(f"greedy=True but params has temperature {params.temperature}; pass temperature 0 params")
    totals = [0.0] * width
    for p, q in zip(target_probs, draft_probs):
        if greedy:
            acc = sibling_acceptance_greedy(int(p.argmax()), _greedy_siblings(q, width))
        else:
            acc = sibling_acceptance(p, q, draw_without_replacement(q, width, generator))
        for k, a in enumerate(acc):
            totals[k] += a
    return _labelled([t / rows for t in totals], params, greedy, "offline", rows)


def acceptance_from_counts(accepted_at_rank: Sequence[int], trials_at_rank: Sequence[int], params) -> AcceptanceVector:
    """Online P: P[k] = (times the rank-k child was the accepted one) / (verified nodes that had a
    rank-k child); 0 where there were no trials. With unequal trial counts sampling noise can push the
    sum over 1; it is then scaled back to 1."""
    if len(accepted_at_rank) != len(trials_at_rank) or not accepted_at_rank:
        raise ValueError("accepted_at_rank and trials_at_rank must be non-empty and of the same length")
    values = []
    for k, (a, t) in enumerate(zip(accepted_at_rank, trials_at_rank)):
        if not (isinstance(a, int) and isinstance(t, int)) or a < 0 or t < 0 or a > t:
            raise ValueError(f"rank {k}: need integers 0 <= accepted <= trials, got accepted={a!r}, trials={t!r}")
        values.append(a / t if t else 0.0)
    total = sum(values)
    if total > 1.0:
        values = [v / total for v in values]
    return _labelled(values, params, params is not None and params.greedy, "online", int(trials_at_rank[0]))


def _labelled(values: list[float], params, greedy: bool, source: str, count: int) -> AcceptanceVector:
    if params is None:
        return AcceptanceVector(values, 0.0 if greedy else 1.0, source=source, num_positions=count)
    return AcceptanceVector(
        values,
        float(params.temperature),
        top_p=float(params.top_p),
        top_k=int(params.top_k),
        source=source,
        num_positions=count,
        min_p=float(getattr(params, "min_p", 0.0)),
    )


# =====================================================================================================
# 4. The dynamic program (as read in Sequoia's tree_search.py)
# =====================================================================================================
#
#   T[n][d][b]  best F of a tree with at most n nodes COUNTING THE ROOT, depth <= d, root with exactly
#               b children.   (Exact-n in the paper; "at most n" gives the same maxima and no
#               infeasible entries below the root-only tree.)
#   T[n][d][0] = 1                                   the root alone (its bonus token)
#   T[n][d][b] = max_{y} ( T[y][d][b-1] + P[b] * max_b' T[n-y][d-1][b'] )
#               the first b-1 children (and the root) get y nodes, the b-th child's subtree n-y.
#   The paper's b = 1 case, 1 + P[1] * max_b' T[n-1][d-1][b'], is this with y = 1.
#   Paper P[b] (1-based: the b-th child) = values[b - 1] here (0-based rank b - 1).
#
#   S[d][n] = max_b T[n][d][b]   (best[d, n] below), with argmaxes kept to rebuild the tree.
#   Vectorised over (n, y) with numpy: O(n^2 d W) work in d * W array operations.


@dataclass
class _Tables:
    values: list[float]
    max_nodes: int  # draft nodes (the DP's n is this + 1)
    max_depth: int
    best: np.ndarray  # [D+1, N+1]: S[d][n], n counting the root (n = 0: no tree, -inf)
    best_b: np.ndarray  # [D+1, N+1]: argmax_b T[n][d][b] (smallest b on ties)
    split: np.ndarray  # [D+1, W+1, N+1]: argmax_y for T[n][d][b] (smallest y on ties)


def _acceptance_list(acceptance) -> list[float]:
    values = acceptance.values if isinstance(acceptance, AcceptanceVector) else acceptance
    out = [float(v) for v in values]
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise ValueError(f"acceptance values must be finite and >= 0, got {out}")
    return out


def _check_budget(num_nodes: int, max_depth: int) -> None:
    if not isinstance(num_nodes, (int, np.integer)) or num_nodes < 0:
        raise ValueError(f"the node budget must be an integer >= 0, got {num_nodes!r}")
    if not isinstance(max_depth, (int, np.integer)) or max_depth < 0:
        raise ValueError(f"max_depth must be an integer >= 0, got {max_depth!r}")


def _solve(acceptance, max_nodes: int, max_depth: int) -> _Tables:
    _check_budget(max_nodes, max_depth)
    P = np.asarray(_acceptance_list(acceptance), dtype=np.float64)
    W, N, D = len(P), int(max_nodes) + 1, int(max_depth)
    n = np.arange(N + 1)[:, None]  # the tree's node budget (root included)
    y = np.arange(N + 1)[None, :]  # nodes for the root + its first b-1 children
    valid = (y >= 1) & (n - y >= 1)  # both parts need at least their own root
    rest = np.where(valid, n - y, 1)  # nodes for the b-th child's subtree

    root_only = np.ones(N + 1)
    root_only[0] = -np.inf
    best = np.full((D + 1, N + 1), -np.inf)
    best_b = np.zeros((D + 1, N + 1), dtype=np.int64)
    split = np.zeros((D + 1, W + 1, N + 1), dtype=np.int64)
    best[0] = root_only  # depth 0: the root alone, F = 1
    for d in range(1, D + 1):
        below = best[d - 1][rest]  # max_b' T[n-y][d-1][b'], finite wherever valid
        T = np.full((W + 1, N + 1), -np.inf)
        T[0] = root_only  # T[n][d][0] = 1
        for b in range(1, min(W, N - 1) + 1):  # a root with b children needs n >= b + 1
            candidates = np.where(valid, T[b - 1][None, :] + P[b - 1] * below, -np.inf)  # paper's P[b]
            split[d, b] = candidates.argmax(axis=1)
            T[b] = candidates.max(axis=1)
        best[d] = T.max(axis=0)
        best_b[d] = T.argmax(axis=0)
    return _Tables(list(P), int(max_nodes), D, best, best_b, split)


def _rebuild(t: _Tables, nodes: int, depth: int) -> list:
    """The optimal subtree for S[depth][nodes] (nodes counting its root), as nested children lists in
    rank order (rank 0 first)."""
    if depth == 0 or nodes <= 1:
        return []
    b = int(t.best_b[depth, nodes])
    children = []
    while b > 0:  # peel off the b-th child: T[n][d][b] = T[y][d][b-1] + P[b] * S[d-1][n-y]
        y = int(t.split[depth, b, nodes])
        children.append(_rebuild(t, nodes - y, depth - 1))
        nodes, b = y, b - 1
    children.reverse()
    return children


def _tree_from_tables(t: _Tables, num_nodes: int, max_depth: int) -> tuple[float, TreeShape]:
    """The best tree with at most `num_nodes` draft nodes and depth <= max_depth: the smallest budget
    that reaches the best score (so no node that adds nothing is kept), rebuilt from the argmaxes."""
    scores = t.best[max_depth, 1 : num_nodes + 2]  # scores[i]: at most i draft nodes
    top = float(scores.max())
    smallest = int(np.argmax(scores >= top - 1e-12 * top))
    shape = TreeShape.from_nested(_rebuild(t, smallest + 1, max_depth))
    return float(scores[smallest]), shape


def optimal_tree(acceptance_values, num_nodes: int, max_depth: int) -> tuple[float, TreeShape]:
    """(F, shape) of the best tree with at most `num_nodes` draft nodes and depth <= max_depth under
    the acceptance vector (a list of P[k] or an AcceptanceVector). F counts the root's bonus token, so
    the empty tree scores 1. The shape is breadth-first with each node's children in rank order."""
    _check_budget(num_nodes, max_depth)
    return _tree_from_tables(_solve(acceptance_values, num_nodes, max_depth), int(num_nodes), int(max_depth))


def optimal_scores(values, max_nodes: int, max_depth: int) -> list[list[float]]:
    """scores[n][d] = the best F with at most n draft nodes and depth <= d, for every n <= max_nodes
    and d <= max_depth, from one DP run."""
    t = _solve(values, max_nodes, max_depth)
    return t.best[:, 1:].T.tolist()


# =====================================================================================================
# 5. Hardware-aware choice of the tree size
# =====================================================================================================


def _interpolate(points: dict[int, float], n: float) -> float:
    """Piecewise-linear in n through the measured points; the first value below the first point; the
    slope of the last two points (never negative) beyond the last."""
    xs = sorted(points)
    if len(xs) == 1 or n <= xs[0]:
        return points[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if n <= hi:
            return points[lo] + (points[hi] - points[lo]) * (n - lo) / (hi - lo)
    lo, hi = xs[-2], xs[-1]
    slope = max(0.0, (points[hi] - points[lo]) / (hi - lo))
    return points[hi] + slope * (n - hi)


@dataclass
class HardwareProfile:
    """Measured forward times in milliseconds: target_ms[n] for n new tokens at `context_len` tokens
    of context (verification of a tree of n - 1 nodes), draft_ms[m] for a draft forward over m tokens."""

    target_ms: dict[int, float]
    draft_ms: dict[int, float]
    context_len: int = 0
    device: str = ""
    dtype: str = ""

    def __post_init__(self) -> None:
        self.target_ms = self._points("target_ms", self.target_ms, positive=True)
        self.draft_ms = self._points("draft_ms", self.draft_ms, positive=False)
        if isinstance(self.context_len, bool) or not isinstance(self.context_len, int) or self.context_len < 0:
            raise ValueError(f"invalid hardware profile: context_len must be an integer >= 0, got {self.context_len!r}")

    @staticmethod
    def _points(name: str, points, positive: bool) -> dict[int, float]:
        if not isinstance(points, dict) or not points:
            raise ValueError(f"invalid hardware profile: {name} must be a non-empty mapping of token count -> ms")
        out: dict[int, float] = {}
        for key, value in points.items():
            try:
                n, ms = int(key), float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"invalid hardware profile: {name} entry {key!r}: {value!r} is not tokens -> ms"
                ) from None
            if n < 1 or not math.isfinite(ms) or ms < 0 or (positive and ms == 0):
                raise ValueError(
                    f"invalid hardware profile: {name}[{key}] = {value!r}; need tokens >= 1 and a time > 0"
                )
            out[n] = ms
        return dict(sorted(out.items()))

    def target_time(self, n: int) -> float:
        return _interpolate(self.target_ms, n)

    def draft_time(self, m: int) -> float:
        return _interpolate(self.draft_ms, m)

    def step_time(self, shape: TreeShape) -> float:
        """One speculative step with `shape`: one draft forward per level that has children to draw
        (the root's catch-up forward yields depth 1; the nodes of depth d yield depth d + 1), then one
        target forward over the root + every node."""
        sizes = shape.level_sizes()
        draft = 0.0
        if sizes:
            draft = self.draft_time(1) + sum(self.draft_time(size) for size in sizes[:-1])
        return draft + self.target_time(len(shape) + 1)

    def to_dict(self) -> dict:
        return {
            "target_ms": {str(k): v for k, v in self.target_ms.items()},
            "draft_ms": {str(k): v for k, v in self.draft_ms.items()},
            "context_len": self.context_len,
            "device": self.device,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> HardwareProfile:
        if not isinstance(d, dict):
            raise ValueError(f"a hardware profile must be a JSON object, got {type(d).__name__}")
        for key in ("target_ms", "draft_ms"):
            if key not in d:
                raise ValueError(f"hardware profile is missing {key!r} (it has {sorted(d)})")
        unknown = set(d) - {"target_ms", "draft_ms", "context_len", "device", "dtype"}
        if unknown:
            raise ValueError(f"hardware profile has unknown keys {sorted(unknown)}")
        return cls(
            d["target_ms"], d["draft_ms"], d.get("context_len", 0), str(d.get("device", "")), str(d.get("dtype", ""))
        )


@dataclass
class TreeChoice:
    num_nodes: int  # the node budget (the shape may use fewer when more nodes add nothing)
    max_depth: int  # the depth limit the shape was optimised under
    shape: TreeShape
    predicted_accept_length: float  # F(shape), bonus token included
    step_time_ms: float | None = None  # HardwareProfile.step_time(shape); None without a profile
    predicted_speedup: float | None = None  # F * t(1) / step time: over plain decoding at t(1) per token

    def summary(self) -> dict:
        return {
            "budget": self.num_nodes,
            "max_depth": self.max_depth,
            "num_nodes": len(self.shape),
            "depth": self.shape.depth,
            "level_sizes": self.shape.level_sizes(),
            "predicted_accept_length": self.predicted_accept_length,
            "step_time_ms": self.step_time_ms,
            "predicted_speedup": self.predicted_speedup,
        }


DEFAULT_BUDGETS = (1, 2, 4, 8, 16, 32, 64)


def _choice_for_budget(t: _Tables, budget: int, max_depth: int, profile: HardwareProfile | None) -> TreeChoice:
    if profile is None:
        score, shape = _tree_from_tables(t, budget, max_depth)
        return TreeChoice(budget, max_depth, shape, score)
    best: TreeChoice | None = None
    plain = profile.target_time(1)
    seen = set()
    # every (nodes <= budget, depth) pair's optimal tree; keep the most tokens per ms. A bigger tree
    # always has a higher score but may cost more than it adds, so the nodes are searched too.
    for depth in range(1, max_depth + 1):
        for nodes in range(1, budget + 1):
            score, shape = _tree_from_tables(t, nodes, depth)
            if shape.parents in seen:
                continue
            seen.add(shape.parents)
            step = profile.step_time(shape)
            choice = TreeChoice(budget, depth, shape, score, step, score * plain / step)
            if best is None or choice.predicted_speedup > best.predicted_speedup * (1 + 1e-12):
                best = choice
    return best


def choice_for_budget(
    values, num_nodes: int, max_depth: int = 10, profile: HardwareProfile | None = None
) -> TreeChoice:
    """One budget: with a profile, the fastest of the optimal trees with at most `num_nodes` nodes and
    depth <= max_depth; without one, the optimal tree of depth <= max_depth (no timing)."""
    _check_budget(num_nodes, max_depth)
    return _choice_for_budget(_solve(values, num_nodes, max_depth), int(num_nodes), int(max_depth), profile)


def choose_tree(
    values, profile: HardwareProfile, budgets: Sequence[int] = DEFAULT_BUDGETS, max_depth: int = 10
) -> list[TreeChoice]:
    """For each node budget, the tree (at most that many nodes, depth 1..max_depth, each the DP's optimum
    for its size) that gives the most predicted tokens per second on `profile`; sorted by budget. One DP
    run serves every budget and depth."""
    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be integers >= 1, got {budgets}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    t = _solve(values, budgets[-1], max_depth)
    return [_choice_for_budget(t, budget, max_depth, profile) for budget in budgets]


def best_choice(choices: Sequence[TreeChoice]) -> TreeChoice:
    """The fastest choice; on a tie the one with fewer nodes."""
    if not choices:
        raise ValueError("no tree choices to pick from")
    if any(c.predicted_speedup is None for c in choices):
        raise ValueError("best_choice needs choices timed with a HardwareProfile")
    return max(choices, key=lambda c: (c.predicted_speedup, -len(c.shape), -c.num_nodes))


# =====================================================================================================
# 6. Tree files
# =====================================================================================================


def tree_file_dict(
    choice: TreeChoice,
    acceptance: AcceptanceVector,
    profile: HardwareProfile | None,
    choices: Sequence[TreeChoice] | None = None,
) -> dict:
    """The JSON object `specgrove tune` writes; "parents" is all parse_tree needs. "num_nodes" is
    the shape's node count, "budget" the budget it was chosen for; "choices" summarises every budget
    considered (just this one when `choices` is not given)."""
    return {
        "parents": list(choice.shape.parents),
        "num_nodes": len(choice.shape),
        "depth": choice.shape.depth,
        "budget": choice.num_nodes,
        "max_depth": choice.max_depth,
        "predicted_accept_length": choice.predicted_accept_length,
        "step_time_ms": choice.step_time_ms,
        "predicted_speedup": choice.predicted_speedup,
        "acceptance": acceptance.to_dict(),
        "profile": None if profile is None else profile.to_dict(),
        "choices": [c.summary() for c in (choices if choices is not None else [choice])],
    }


def load_tree_file(path: str | Path) -> tuple[TreeShape, dict]:
    """Read and check a tree file: (the shape, the whole JSON object)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"tree file {path} does not exist; write one with `specgrove tune --out {path}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("parents"), list):
        raise ValueError(f"{path} is not a tree file: it needs a 'parents' list (as `specgrove tune` writes)")
    try:
        shape = TreeShape(tuple(data["parents"]))
    except (TypeError, ValueError, IndexError) as e:  # IndexError: TreeShape computes depths before its check
        raise ValueError(f"{path}: bad 'parents' {data['parents']}: {e}") from None
    for key, actual in (("num_nodes", len(shape)), ("depth", shape.depth)):
        if key in data and data[key] != actual:
            raise ValueError(f"{path}: {key!r} says {data[key]} but 'parents' gives {actual}")
    try:
        if data.get("acceptance") is not None:
            AcceptanceVector.from_dict(data["acceptance"])
        if data.get("profile") is not None:
            HardwareProfile.from_dict(data["profile"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return shape, data


def parse_tree(spec: str) -> TreeShape:
    """Every tree spec: `TreeShape.parse`'s ('chain:5', 'kary:2x3', 'widths:4,2,1', 'SPEC@N'), a tree .json file
    written by `specgrove tune`, or 'sequoia:N:FILE.json' / 'sequoia:NxD:FILE.json': the DP's tree of at most N
    nodes (depth <= D) that maximises the expected accepted tokens under FILE's acceptance vector, with no regard
    to time."""
    text = str(spec).strip()
    if text.startswith("sequoia:"):
        return _sequoia_tree(text)
    if text.endswith(".json"):
        return load_tree_file(text)[0]
    if "@" in text:
        base, _, count = text.rpartition("@")
        if count.isdigit():
            return parse_tree(base).truncated(int(count))
    return TreeShape.parse(text)


def _sequoia_tree(text: str) -> TreeShape:
    _, size, path = text.split(":", 2) if text.count(":") >= 2 else (None, "", "")
    nodes, _, depth = size.lower().partition("x")
    if not nodes.isdigit() or (depth and not depth.isdigit()) or not path:
        raise ValueError(
            f"bad tree spec {text!r}: use sequoia:N:FILE.json or sequoia:NxD:FILE.json "
            "(N nodes, depth <= D, FILE written by `specgrove tune`)"
        )
    _, data = load_tree_file(path)
    if data.get("acceptance") is None:
        raise ValueError(f"{path} has no acceptance vector; write it with `specgrove tune --out {path}`")
    acceptance = AcceptanceVector.from_dict(data["acceptance"])
    return optimal_tree(acceptance.values, int(nodes), int(depth or nodes))[1]
