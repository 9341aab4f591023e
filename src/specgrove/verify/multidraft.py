"""Multi-draft verification (SpecHub, Sun et al. 2024) and the exact one-step acceptance of each method.

A node of a token tree with k children is a k-draft step. Three ways to draw the children and verify
them, all exact (the emitted token is distributed as the target's p):

  rrs     children i.i.d. from the draft's q; recursive rejection sampling (SpecInfer): child j is
          accepted with min(1, p_j(x)/q(x)), on rejection p_{j+1} = normalize(max(0, p_j - q));
  rrs_wo  children drawn without replacement (child j from q with the earlier children removed and
          renormalised, q_j); the same recursion with q_j (Sequoia's verification);
  spechub k = 2 children from SpecHub's sparse joint distribution around the hub a = argmax q:
          x1 ~ q; the pair is (x1, a) if x1 != a, else (a, x2) with x2 ~ q(. | != a). So
          Q(i, a) = q(i) and Q(a, i) = q(a) q(i) / (1 - q(a)) for i != a, and every pair holds a.

SpecHub's verifier is the optimal coupling of Q and p for the membership cost (accept a token of the
pair whenever possible), which on this sparse support has a closed form:
  token i != a lies only in the pairs (i, a) and (a, i): it takes alpha_i = min(p(i), q(i)) of the
  first and beta_i = min(p(i) - alpha_i, Q(a, i)) of the second; the mass the pairs have left,
  L = 1 - sum_i (alpha_i + beta_i), goes to the hub a as far as p(a) allows; whatever remains of p is
  the residual, sampled when nothing is accepted. As a sequential rule on the drawn pair:
    pair (i, a): accept i with min(1, p(i)/q(i));
    pair (a, i): accept i with min(1, max(0, p(i) - q(i)) / Q(a, i));
    either pair, i not accepted: accept a with min(1, p(a)/L);
    otherwise sample r = (p(i) - alpha_i - beta_i for i != a; p(a) - min(p(a), L) at a), normalised.
  P(accept) = min(1, p(a) + sum_{i != a} min(p(i), q(i) + Q(a, i))), which is the OTM bound of Q
  (no coupling of Q and p can put more mass on "the target token is one of the pair"): SpecHub is
  optimal for its own draft distribution; what it trades is the draft distribution itself.

The OTM bound of any joint draft distribution Q over ordered pairs (`otm_bound`) is the LP
  maximise sum_{pairs s, y in s} pi(s, y)  s.t.  sum_y pi(s, y) <= Q(s),  sum_{s containing y} pi(s, y) <= p(y),
over the membership entries only: a coupling's other entries can always be filled in afterwards (the
mass left on both sides is equal), so this compact LP has the same optimum as the full |V|^3 one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from specgrove.verify.speculative import rejection_select, residual_distribution

METHODS = ("rrs", "rrs_wo", "spechub")


# ---- SpecHub's draft ----------------------------------------------------------------------------------
def hub_of(q: torch.Tensor) -> int:
    """The hub token: the draft's most likely token (the first of equal maxima, as torch.argmax)."""
    return int(torch.argmax(q))


def draw_hub_pair(q: torch.Tensor, sampler) -> list[tuple[int, torch.Tensor]]:
    """Two children from SpecHub's sparse joint distribution, each with the q it was drawn from: the
    first from q itself; the second is the hub (a point mass) when the first is not, else drawn from q
    with the hub removed. Only one child comes back when q is a point mass (there is no second token)."""
    hub = hub_of(q)
    first = sampler.categorical(q)
    if first != hub:
        point = torch.zeros_like(q)
        point[hub] = 1.0
        return [(first, q), (hub, point)]
    rest = q.clone()
    rest[hub] = 0.0
    total = float(rest.sum())
    if total <= 0.0:
        return [(first, q)]
    return [(first, q), (sampler.categorical(rest / total), rest / total)]


def hub_joint(q: torch.Tensor) -> torch.Tensor:
    """SpecHub's joint draft distribution as a [V, V] matrix Q[x1, x2]."""
    q = q.double()
    hub = hub_of(q)
    joint = torch.zeros(q.shape[-1], q.shape[-1], dtype=torch.float64)
    joint[:, hub] = q
    joint[hub, hub] = 0.0
    rest = _off_hub_mass(q, hub)
    if rest > 0.0:
        joint[hub, :] = q * float(q[hub]) / rest
        joint[hub, hub] = 0.0
    else:
        joint[hub, hub] = 1.0  # q is a point mass on the hub: the "pair" is the hub alone
    return joint


# ---- SpecHub's verifier -------------------------------------------------------------------------------
@dataclass
class HubPlan:
    """The optimal coupling of SpecHub's joint draft distribution and the target p, per token."""

    hub: int
    pair_second: torch.Tensor  # Q(hub, i): probability of the pair (hub, i), 0 at the hub
    first: torch.Tensor  # alpha: mass of y = i taken from the pair (i, hub)
    second: torch.Tensor  # beta: mass of y = i taken from the pair (hub, i)
    to_hub: float  # min(p(hub), L): mass of y = hub taken from the pairs' leftover L
    hub_accept: float  # min(1, p(hub) / L): share of every pair's leftover that goes to the hub
    residual: torch.Tensor  # p less everything accepted (unnormalised)

    @property
    def acceptance(self) -> float:
        """P(the emitted token is one of the pair)."""
        return float(self.first.sum() + self.second.sum()) + self.to_hub


def hub_plan(p: torch.Tensor, q: torch.Tensor) -> HubPlan:
    p = p.double()
    q = q.double()
    hub = hub_of(q)
    rest = _off_hub_mass(q, hub)
    second_cap = q * (float(q[hub]) / rest) if rest > 0.0 else torch.zeros_like(q)
    second_cap[hub] = 0.0
    first = torch.minimum(p, q)
    second = torch.minimum((p - first).clamp_min(0.0), second_cap)
    first[hub] = 0.0
    second[hub] = 0.0
    leftover = max(0.0, 1.0 - float(first.sum() + second.sum()))
    to_hub = min(float(p[hub]), leftover)
    residual = (p - first - second).clamp_min(0.0)
    residual[hub] = max(0.0, float(p[hub]) - to_hub)
    hub_accept = 1.0 if leftover <= 0.0 else min(1.0, float(p[hub]) / leftover)
    return HubPlan(hub, second_cap, first, second, to_hub, hub_accept, residual)


def _off_hub_mass(q: torch.Tensor, hub: int) -> float:
    """Sum of q off the hub, as the draw normalises by (not 1 - q(hub): in float32 q(hub) can round to
    1.0 while other tokens keep a little mass, and the second draft is still drawn from that mass)."""
    q = q.double()
    return float(q.sum() - q[hub])


def _is_hub_pair(child_tokens: Sequence[int], child_draft_probs: Sequence, hub: int) -> bool:
    if child_tokens[0] == hub:
        return child_tokens[1] != hub
    second = child_draft_probs[1]
    return child_tokens[1] == hub and second is not None and float(second[hub]) == 1.0


def spechub_select(
    p: torch.Tensor, child_tokens: Sequence[int], child_draft_probs: Sequence[torch.Tensor | None], sampler
) -> tuple[int | None, torch.Tensor]:
    """Node rule (see specgrove.verify.speculative.verify_tree) for children drawn by `draw_hub_pair`.
    A node with one child is standard speculative sampling, one with more than two (or a deterministic
    proposal) recursive rejection sampling over the recorded q's."""
    if len(child_tokens) != 2 or any(q is None for q in child_draft_probs):
        return rejection_select(p, child_tokens, child_draft_probs, sampler)
    q = child_draft_probs[0]
    plan = hub_plan(p, q)
    if not _is_hub_pair(child_tokens, child_draft_probs, plan.hub):
        raise ValueError(
            f"children {list(child_tokens)} are not a SpecHub pair around the hub {plan.hub}; "
            "SpecHub's verifier needs children drawn by draw_hub_pair (tree_sampling='hub')"
        )
    hub_position = 0 if child_tokens[0] == plan.hub else 1
    other_position = 1 - hub_position
    other = child_tokens[other_position]
    if hub_position == 1:  # pair (i, hub): i was drawn from q
        take, drawn_with = float(plan.first[other]), float(q[other])
    else:  # pair (hub, i): i was drawn with probability Q(hub, i)
        take, drawn_with = float(plan.second[other]), float(plan.pair_second[other])
    if drawn_with <= 0.0:
        raise ValueError(f"draft token {other} has probability 0 under the q it was said to be drawn from")
    if sampler.bernoulli(min(1.0, take / drawn_with)):
        return other_position, p
    if sampler.bernoulli(plan.hub_accept):
        return hub_position, p
    total = float(plan.residual.sum())
    if total <= 1e-12:  # only rounding can get here
        return None, p
    return None, (plan.residual / total).to(p.dtype)


# ---- exact one-step acceptance --------------------------------------------------------------------------
def spechub_dominates(p: torch.Tensor, q: torch.Tensor) -> bool:
    """A sufficient condition for SpecHub's two-draft acceptance to be at least that of RRS and of RRS
    without replacement: TV(p, q) <= q(a), a the hub (derived here; the paper's own theorem was not at hand).

    Why: all three accept sum_x min(p(x), q(x)) =: beta with the first draft (each first draft is marginally
    q); a token x with p(x) > q(x) then adds at most min(p(x) - q(x), q(x) TV / (1 - q(a))) under RRS w/o
    (the rejected first draft x1 has weight (q - p)+(x1), total TV = 1 - beta, and q(x1) <= q(a)),
    at most min(p(x) - q(x), TV q(x)) under RRS, and exactly min(p(x) - q(x), q(x) q(a) / (1 - q(a))) under
    SpecHub for x != a, while the hub itself gets all of p(a) under SpecHub. For RRS alone the weaker
    TV <= q(a) / (1 - q(a)) suffices (for instance q(a) >= 1/2)."""
    p = p.double()
    q = q.double()
    return 0.5 * float((p - q).abs().sum()) <= float(q.max()) + 1e-12


def _without(q: torch.Tensor, token: int) -> torch.Tensor:
    rest = q.clone()
    rest[token] = 0.0
    total = rest.sum()
    return rest / total if total > 0 else rest


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, method: str, k: int = 2) -> float:
    """P(one of the k drafts is accepted) in one step, computed exactly (no sampling).

    rrs: any k (the residual after a rejection does not depend on which token was rejected, so
    P = 1 - prod_j (1 - sum min(p_j, q))); rrs_wo: k <= 2 (a sum over the first draft); spechub: k = 2.
    k = 1 is standard speculative sampling for every method."""
    if method not in METHODS:
        raise ValueError(f"unknown multi-draft method {method!r}; use one of {', '.join(METHODS)}")
    p = p.double()
    q = q.double()
    if k < 1:
        raise ValueError("k must be at least 1")
    if k == 1:
        return float(torch.minimum(p, q).sum())
    if method == "rrs":
        rejected, current = 1.0, p
        for _ in range(k):
            rejected *= 1.0 - float(torch.minimum(current, q).sum())
            current = residual_distribution(current, q)
        return 1.0 - rejected
    if k != 2:
        raise ValueError(f"{method} acceptance is computed for k <= 2 drafts (got {k})")
    if method == "spechub":
        return min(1.0, hub_plan(p, q).acceptance)
    first = torch.minimum(p, q)
    after = residual_distribution(p, q)  # the same whichever first draft was rejected
    total = float(first.sum())
    for token in torch.nonzero(q > 0).flatten().tolist():
        reject = float(q[token]) - float(first[token])
        if reject > 0.0:
            total += reject * float(torch.minimum(after, _without(q, token)).sum())
    return total


def joint_draft_distribution(q: torch.Tensor, method: str) -> torch.Tensor:
    """The joint distribution Q[x1, x2] of a 2-draft step under each method."""
    q = q.double()
    if method == "rrs":
        return torch.outer(q, q)
    if method == "rrs_wo":
        rest = (1.0 - q).clamp_min(1e-300)
        joint = q[:, None] * q[None, :] / rest[:, None]
        joint.fill_diagonal_(0.0)
        return joint
    if method == "spechub":
        return hub_joint(q)
    raise ValueError(f"unknown multi-draft method {method!r}; use one of {', '.join(METHODS)}")


def otm_bound(p: torch.Tensor, joint: torch.Tensor) -> float:
    """The optimal-transport-with-membership-cost bound: the largest P(target token in the drafted
    pair) over all couplings of the joint draft distribution `joint` [V, V] and p, by scipy's HiGHS."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    p_np = p.double().cpu().numpy()
    joint_np = joint.double().cpu().numpy()
    first, second = np.nonzero(joint_np > 0)
    members = []  # (pair index, member token)
    for s, (a, b) in enumerate(zip(first, second)):
        members.append((s, a))
        if b != a:
            members.append((s, b))
    if not members:
        return 0.0
    pair_of = np.array([m[0] for m in members])
    token_of = np.array([m[1] for m in members])
    n_vars, n_pairs, vocab = len(members), len(first), len(p_np)
    rows = np.concatenate([pair_of, n_pairs + token_of])
    cols = np.concatenate([np.arange(n_vars), np.arange(n_vars)])
    a_ub = coo_matrix((np.ones(2 * n_vars), (rows, cols)), shape=(n_pairs + vocab, n_vars)).tocsr()
    b_ub = np.concatenate([joint_np[first, second], p_np])
    result = linprog(-np.ones(n_vars), A_ub=a_ub, b_ub=b_ub, bounds=(0, None), method="highs")
    if result.status != 0:
        raise RuntimeError(f"the OTM linear program did not solve: {result.message}")
    return float(-result.fun)
