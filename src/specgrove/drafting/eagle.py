"""Drafting with a feature-level head (EAGLE family, specgrove.models.eagle): chains, static trees, EAGLE-2's
dynamic tree, and a mixed tree with a prompt-lookup branch.

The engine hands the proposer the target's features of every committed token (`feature_layers`,
`seq.target_features`), from its own prefill and verification forwards. Before drafting, the head runs the new
committed pairs (the target's features of token t, token t+1) with those true features: its KV cache then holds
exactly the committed context, and the last pair's output gives the root's distribution and the hidden state
fed to depth 1. Deeper nodes feed the head its own output at their parent (`_level_forward`).

Trees:
  a chain or a static shape (`TreeShape`, as the draft model fills it, `DraftModelProposer`): children drawn
      from the head's q without replacement (or i.i.d., or SpecHub's pairs), q recorded for the verifier;
      greedy: the head's top-n, deterministic;
  dynamic (EAGLE-2, `DynamicTree`): level by level, the `top_k` nodes of the level with the highest
      cumulative draft log-probability are expanded, each with its `top_k` most likely children; at the end
      the `nodes` best of all candidates by cumulative log-probability form the tree. Every choice is a
      deterministic function of the head's outputs, so the tree is proposed deterministically and verified
      as such (point masses), at every temperature;
  mixed: the dynamic tree plus prompt lookup's continuation, when it finds one, as one more branch from the
      root (deterministic too; a head candidate equal to a branch token is the same node).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specgrove.drafting.draft_model import BATCHED_CATCH_UP, DraftModelProposer, _Draft
from specgrove.drafting.prompt_lookup import PromptLookupProposer
from specgrove.engine.sequence import Sequence
from specgrove.models.eagle import EagleHead
from specgrove.models.kv_cache import PREFILL_CHUNK, CachePool
from specgrove.sampling import SamplingParams
from specgrove.trees.dynamic import DynamicTree
from specgrove.trees.shape import TreeShape
from specgrove.trees.tree import TokenTree, path_to


class EagleProposer(DraftModelProposer):
    name = "eagle"

    def __init__(
        self,
        head: EagleHead,
        max_model_len: int,
        shape: TreeShape | Callable[[SamplingParams], TreeShape] | DynamicTree | None = None,
        sampling: str = "without_replacement",
        lookup: PromptLookupProposer | None = None,
    ):
        self.head = head
        self.model = head
        self.max_model_len = max_model_len
        self.pool = CachePool(head, max_model_len)
        self.dynamic = shape if isinstance(shape, DynamicTree) else None
        self.shape = None if self.dynamic is not None else shape
        self._set_sampling(sampling)
        self.lookup = lookup or PromptLookupProposer(1, 3)
        self.feature_layers = head.feature_layers

    def shape_for(self, num_tokens: int, params: SamplingParams) -> TreeShape:
        if self.dynamic is not None:
            shape = self.dynamic.shape()
            return shape if num_tokens >= len(shape) else shape.truncated(num_tokens)
        return super().shape_for(num_tokens, params)

    # ---- the head's cache: committed pairs from the target's true features ----------------------------
    def _state(self, seq: Sequence) -> dict:
        state = seq.proposer_state.get(self.name)
        if state is None:
            # pairs: how many committed pairs the row holds (pair t = features of token t, token t+1);
            # feature_base: the index of the first feature row still in seq.target_features.
            state = {"row": self.pool.acquire(), "tokens": [], "pairs": 0, "feature_base": 0, "tree": TokenTree()}
            seq.proposer_state[self.name] = state
        return state

    def prefill(self, seq: Sequence, num_tokens: int) -> int:
        """Nothing: the head's pairs are built from the target's features, which the engine's prefill appends
        to `seq.target_features`; the head runs them at its first call (one layer, a small part of a step)."""
        return 0

    def _take_features(self, seq: Sequence, state: dict, upto: int) -> torch.Tensor:
        """The target's feature rows state['pairs'] .. upto-1, dropping what is consumed from the sequence."""
        chunks = seq.target_features
        feats = torch.cat(chunks) if len(chunks) > 1 else chunks[0] if chunks else None
        base, first = state["feature_base"], state["pairs"]
        have = 0 if feats is None else feats.shape[0]
        if first < base or upto > base + have:
            raise RuntimeError(
                f"{seq.request_id}: the target's features cover tokens {base}..{base + have - 1}, the head needs "
                f"{first}..{upto - 1} (the sequence was changed without the engine's forwards)"
            )
        out = feats[first - base : upto - base]
        seq.target_features[:] = [feats[upto - base :]] if upto - base < have else []
        state["feature_base"] = upto
        return out

    def _catch_up(self, states: list[dict], seqs: list[Sequence]):
        """Run each sequence's new committed pairs through the head (committed); return per sequence the root
        (logits after its last pair, the head's output there) and the forwards it took."""
        cache = self.pool.cache
        token_lists = [list(seq.token_ids) for seq in seqs]
        news = []
        for st, toks, seq in zip(states, token_lists, seqs):
            n = len(toks) - 1  # pairs 0..n-1 exist: token n has no features yet
            if st["tokens"] and (toks[: st["pairs"] + 1] != st["tokens"][: st["pairs"] + 1] or n < st["pairs"]):
                raise RuntimeError(f"{seq.request_id}: the sequence's tokens changed under the draft head's cache")
            cache.truncate(st["row"], st["pairs"])  # drop the last tree's slots: committed pairs are rerun
            feats = self._take_features(seq, st, n) if n > st["pairs"] else None
            news.append((st["pairs"], n, feats))
            st["tokens"] = list(toks)
            st["tree"] = TokenTree()
        roots: list = [None] * len(states)
        forwards = [0] * len(states)
        short = [i for i, (a, b, _) in enumerate(news) if 0 < b - a <= BATCHED_CATCH_UP]
        for i, (first, end, feats) in enumerate(news):
            if end - first > BATCHED_CATCH_UP:
                for start in range(first, end, PREFILL_CHUNK):
                    stop = min(start + PREFILL_CHUNK, end)
                    logits, hidden = self.head.forward(
                        torch.tensor([token_lists[i][start + 1 : stop + 1]]),
                        feats[None, start - first : stop - first],
                        torch.arange(start + 1, stop + 1)[None],
                        cache,
                        from_target=True,
                        rows=[states[i]["row"]],
                        logits_at="last" if stop == end else None,
                    )
                    cache.commit(states[i]["row"])
                    forwards[i] += 1
                roots[i] = (logits[0, -1], hidden[0, -1])
        if short:
            width = max(news[i][1] - news[i][0] for i in short)
            ids = torch.zeros(len(short), width, dtype=torch.long)
            positions = torch.zeros(len(short), width, dtype=torch.long)
            inputs = torch.zeros(len(short), width, news[short[0]][2].shape[-1], dtype=news[short[0]][2].dtype)
            for b, i in enumerate(short):
                first, end, feats = news[i]
                ids[b, : end - first] = torch.tensor(token_lists[i][first + 1 : end + 1])
                positions[b, : end - first] = torch.arange(first + 1, end + 1)
                positions[b, end - first :] = end
                inputs[b, : end - first] = feats
            rows = [states[i]["row"] for i in short]
            num_new = [news[i][1] - news[i][0] for i in short]
            logits, hidden = self.head.forward(
                ids, inputs, positions, cache, from_target=True, rows=rows, logits_at="last", num_new=num_new
            )
            for b, i in enumerate(short):
                cache.commit(rows[b])
                forwards[i] += 1
                roots[i] = (logits[b, -1], hidden[b, num_new[b] - 1])
        for i, (_, end, _) in enumerate(news):
            states[i]["pairs"] = end
            if roots[i] is None:  # nothing committed since the last call (a step retried): the same root
                roots[i] = states[i]["root"]
            states[i]["root"] = roots[i]
        return roots, forwards

    def _can_draft(self, seq: Sequence) -> bool:
        # a one-token prompt has no pair yet (its token has no features before the first step)
        return len(seq.token_ids) > 1

    def _new_draft(self, shape: TreeShape, seq: Sequence, root, num_tokens: int):
        logits, hidden = root
        root_position = len(seq.token_ids) - 1
        if self.dynamic is None:
            return _Draft(shape, root_position, logits, hidden)
        budget = min(num_tokens, self.dynamic.nodes)
        # the branch takes at most half the budget: the head drafts the rest
        branch = self.lookup.lookup(seq.token_ids, min(self.dynamic.lookup, max(1, budget // 2)))
        return _DynamicDraft(self.dynamic, budget, root_position, logits, hidden, branch)

    def _level_forward(self, drafts, ids, positions, parents, mask, rows, num_new):
        inputs = torch.zeros(ids.shape[0], ids.shape[1], self.head.config.hidden_size, dtype=self.head.model.dtype)
        for b, d in enumerate(drafts):
            for j in range(num_new[b]):
                inputs[b, j] = d.hidden_of[int(parents[b, j])]
        return self.head.forward(
            ids,
            inputs,
            positions,
            self.pool.cache,
            from_target=False,
            tree_mask=mask,
            extend=True,
            rows=rows,
            num_new=num_new,
        )


class _DynamicDraft:
    """One sequence's EAGLE-2 tree while it is drafted. `tokens`, `parents`, `depths` are the nodes written
    through the head (the expanded ones, which `_grow` runs); `candidates` every node that may enter the tree."""

    def __init__(
        self,
        plan: DynamicTree,
        budget: int,
        root_position: int,
        root_logits: torch.Tensor,
        root_hidden: torch.Tensor,
        branch: list[int],
    ):
        self.plan = plan
        self.budget = budget
        self.num_levels = plan.depth
        self.root_position = root_position
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.logits_of: dict[int, torch.Tensor] = {-1: root_logits}
        self.hidden_of: dict[int, torch.Tensor] = {-1: root_hidden}
        self.level_start = 0
        self.done = False
        # candidate: [token, parent candidate (-1 root), cumulative log-prob, depth, written node or None, forced]
        self.candidates: list[list] = []
        self.child: dict[tuple[int, int], int] = {}  # (parent candidate, token) -> candidate
        self.frontier: list[int] = [-1]  # candidates expanded at the next level (-1: the root)
        self.written_of: dict[int, int] = {-1: -1}  # candidate -> written node
        parent = -1
        for depth, token in enumerate(branch, 1):  # the prompt-lookup branch: kept whatever its score
            parent = self._add(token, parent, 0.0, depth, forced=True)

    def _add(self, token: int, parent: int, score: float, depth: int, forced: bool = False) -> int:
        key = (parent, token)
        if key in self.child:  # the same node (a branch token the head also proposes)
            c = self.child[key]
            self.candidates[c][2] = max(self.candidates[c][2], score)
            return c
        self.candidates.append([token, parent, score, depth, None, forced])
        self.child[key] = len(self.candidates) - 1
        return len(self.candidates) - 1

    def path_tokens(self, candidate: int) -> list[int]:
        """The tokens from the root (excluded) to `candidate` (included; -1: the root, no tokens)."""
        return [self.candidates[c][0] for c in path_to(candidate, lambda c: self.candidates[c][1])]

    def draw_level(self, depth: int, seq: Sequence, sampling: str) -> bool:
        """Expand the frontier with each node's top-k children; the next frontier is the top-k of them by
        cumulative log-probability, written through the head (unless this is the last level)."""
        self.level_start = len(self.tokens)
        new = []
        for c in self.frontier:
            # ranked by the head's penalised log-probabilities (the node's own context), as the target will judge
            logits = seq.penalised(self.logits_of[self.written_of[c]], self.path_tokens(c))
            logq = torch.log_softmax(logits.float(), -1)
            values, tokens = logq.topk(min(self.plan.top_k, logq.shape[-1]))
            base = 0.0 if c < 0 else self.candidates[c][2]
            for v, t in zip(values.tolist(), tokens.tolist()):
                if v == float("-inf"):
                    break
                new.append(self._add(int(t), c, base + v, depth))
        if not new:
            return False
        ranked = sorted(dict.fromkeys(new), key=lambda c: -self.candidates[c][2])
        self.frontier = ranked[: self.plan.top_k]
        if depth < self.num_levels:
            for c in self.frontier:
                token, parent = self.candidates[c][0], self.candidates[c][1]
                self.written_of[c] = len(self.tokens)
                self.candidates[c][4] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(self.written_of[parent])
                self.depths.append(depth)
        return True

    def tree(self, greedy: bool) -> TokenTree:
        """The chosen candidates as a tree, deterministic at every temperature (no q: point masses)."""
        ranked = self.chosen()
        index = {c: i for i, c in enumerate(ranked)}
        tokens = [self.candidates[c][0] for c in ranked]
        parents = [-1 if self.candidates[c][1] < 0 else index[self.candidates[c][1]] for c in ranked]
        return TokenTree(tokens, parents, None)

    def chosen(self) -> list[int]:
        """The `budget` best candidates (the branch first, then by cumulative log-probability, a parent always
        before its children), in tree order (by depth)."""
        order = sorted(
            range(len(self.candidates)),
            key=lambda c: (not self.candidates[c][5], -self.candidates[c][2], self.candidates[c][3]),
        )
        chosen: set[int] = set()
        for c in order:
            if len(chosen) >= self.budget:
                break
            if self.candidates[c][1] in chosen or self.candidates[c][1] < 0:
                chosen.add(c)
        return sorted(chosen, key=lambda c: (self.candidates[c][3], c))
