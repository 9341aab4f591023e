"""A draft model filling a token tree, one draft forward per tree level.

A chain of k tokens (the classic draft-model method) is the tree `chain:k`; Sequoia's trees and k-ary
trees are other shapes (specgrove.trees.shape). At every node the children are drawn from the draft's
processed distribution q (the same `process_logits` as the target):

  without_replacement (Sequoia, Alg. 1): child j is drawn from q_j = q with the earlier siblings
      removed and renormalised, and q_j is what the tree records for it;
  iid (SpecInfer): every child is drawn from q itself;
  hub (SpecHub): a node with two children gets a pair from SpecHub's sparse joint distribution
      (specgrove.verify.multidraft.draw_hub_pair); other nodes are drawn without replacement;
  greedy (temperature 0): the children are the draft's top-n tokens (a deterministic proposal).

Recording the q each child was really drawn from is what keeps verification exact (the verifier in
specgrove.verify.speculative uses it as is). All nodes of one depth go through the draft in one
forward with a tree mask, written as uncommitted slots of the draft's KV cache after the sequence's
committed tokens (`LlamaModel.forward(..., extend=True)`). At the next call the path the target
accepted is kept from those slots (`KVCache.commit`), so accepted tokens are not recomputed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specgrove.drafting.base import Proposer
from specgrove.engine.sequence import Sequence
from specgrove.models.kv_cache import CachePool, forward_chunked
from specgrove.models.loader import LoadedModel
from specgrove.sampling import SamplingParams, process_logits
from specgrove.trees.shape import TreeShape
from specgrove.trees.tree import TokenTree, path_to
from specgrove.verify.multidraft import draw_hub_pair, spechub_select
from specgrove.verify.speculative import rejection_select

SAMPLING_MODES = ("without_replacement", "iid", "hub")
BATCHED_CATCH_UP = 32  # catch-ups up to this many tokens share one batched draft forward; longer ones
# (a new prompt) run alone, chunked as the target's prefill


def draw_children(
    logits: torch.Tensor, count: int, params, sampler, sampling: str = "without_replacement"
) -> list[tuple[int, torch.Tensor | None]]:
    """`count` children of one node as (token, the q it was drawn from; None = deterministic).

    Greedy: the top-`count` tokens of the draft logits. Otherwise each child is drawn from the processed
    draft distribution q; without replacement, child j's q is q with children 0..j-1 removed and
    renormalised (drawing one by one from these is the same law as Sequoia's exponential race / Gumbel
    top-n, and goes through the sampler so the exactness tests can enumerate it). Fewer children come
    back when q has fewer tokens in its support than `count`.
    """
    if params.greedy:
        return [(int(t), None) for t in torch.topk(logits, min(count, logits.shape[-1])).indices.tolist()]
    q = process_logits(logits, params)
    if sampling == "hub" and count == 2:
        return draw_hub_pair(q, sampler)
    children = []
    for _ in range(count):
        if float(q.sum()) <= 0.0:
            break
        token = sampler.categorical(q)
        children.append((token, q))
        if sampling != "iid":
            q = q.clone()
            q[token] = 0.0
            total = q.sum()
            q = q / total if total > 0 else q
    return children


class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(
        self,
        draft: LoadedModel,
        max_model_len: int,
        shape: TreeShape | Callable[[SamplingParams], TreeShape] | None = None,
        sampling: str = "without_replacement",
    ):
        self._set_sampling(sampling)
        if (
            shape is not None
            and not draft.model.supports_trees
            and not (isinstance(shape, TreeShape) and shape.is_chain())
        ):
            raise ValueError(f"token trees need a Llama-family draft model; {draft.name} runs chains only")
        self.draft = draft
        self.model = draft.model
        self.max_model_len = max_model_len
        self.pool = CachePool(self.model, max_model_len)  # one row per sequence being drafted for
        # None: a chain of whatever length the engine asks for; a callable: a shape per sampling setting
        # (the "auto" tree, tuned per setting).
        self.shape = shape

    def _set_sampling(self, sampling: str) -> None:
        """How siblings are drawn, and the verifier that goes with it (the engine asks for `node_rule`)."""
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sibling sampling {sampling!r} is unknown; use one of {', '.join(SAMPLING_MODES)}")
        self.sampling = sampling
        self.node_rule = spechub_select if sampling == "hub" else rejection_select

    def shape_for(self, num_tokens: int, params: SamplingParams) -> TreeShape:
        if self.shape is None:
            return TreeShape.chain(num_tokens)
        shape = self.shape if isinstance(self.shape, TreeShape) else self.shape(params)
        return shape if num_tokens >= len(shape) else shape.truncated(num_tokens)

    # ---- the draft's KV cache ------------------------------------------------------------------
    def _state(self, seq: Sequence) -> dict:
        state = seq.proposer_state.get(self.name)
        if state is None:
            # row: the sequence's row of the draft cache pool; tokens: what that row has committed;
            # tree: the nodes written as uncommitted slots last time.
            state = {"row": self.pool.acquire(), "tokens": [], "tree": TokenTree()}
            seq.proposer_state[self.name] = state
        return state

    def _reconcile(self, state: dict, tokens: list[int]) -> list[int]:
        """Bring the row's committed tokens to a prefix of `tokens` (never all of them: the last one's
        logits are needed) and return the tokens still to run. The accepted path of the last tree is kept
        from the uncommitted slots; anything else that differs is rolled back."""
        cached: list[int] = state["tokens"]
        cache, row = self.pool.cache, state["row"]
        if len(cached) < len(tokens) and tokens[: len(cached)] == cached:
            # Walk the last tree along the new tokens (never the last one: its logits are needed).
            written: TokenTree = state["tree"]
            path, node = [], -1
            for token in tokens[len(cached) : len(tokens) - 1]:
                node = next((c for c in written.children(node) if written.tokens[c] == token), None)
                if node is None:
                    break
                path.append(node)
            cache.commit(row, path)
            common = len(cached) + len(path)
        else:
            common = 0
            limit = min(len(cached), len(tokens) - 1)
            while common < limit and cached[common] == tokens[common]:
                common += 1
            cache.truncate(row, common)
        state["tokens"] = list(tokens)
        state["tree"] = TokenTree()
        return tokens[common:]

    def _catch_up(self, states: list[dict], seqs: list[Sequence]) -> tuple[list[torch.Tensor], list[int]]:
        """Bring every state's row to its sequence's tokens; return the draft logits [V] after each last token
        and the forwards each took. Short catch-ups (the usual 1..k+1 tokens) run as one batched forward; long
        ones (a new prompt) run alone, in chunks."""
        cache = self.pool.cache
        token_lists = [list(seq.token_ids) for seq in seqs]
        news = [self._reconcile(st, toks) for st, toks in zip(states, token_lists)]
        out: list[torch.Tensor | None] = [None] * len(states)
        forwards = [1] * len(states)
        short = [i for i, n in enumerate(news) if len(n) <= BATCHED_CATCH_UP]
        for i in (i for i in range(len(states)) if len(news[i]) > BATCHED_CATCH_UP):
            start = len(token_lists[i]) - len(news[i])
            out[i], forwards[i] = forward_chunked(self.model, cache, states[i]["row"], news[i], start, want_logits=True)
        if short:
            width = max(len(news[i]) for i in short)
            ids = torch.zeros(len(short), width, dtype=torch.long)
            positions = torch.zeros(len(short), width, dtype=torch.long)
            for b, i in enumerate(short):
                n, end = len(news[i]), len(token_lists[i])
                ids[b, :n] = torch.tensor(news[i])
                positions[b, :n] = torch.arange(end - n, end)
                positions[b, n:] = end - 1
            rows = [states[i]["row"] for i in short]
            logits = self.model.forward(
                ids, positions, cache, rows=rows, logits_at="last", num_new=[len(news[i]) for i in short]
            )
            for b, i in enumerate(short):
                cache.commit(rows[b])
                out[i] = logits[b, -1]
        return out, forwards

    def prefill(self, seq: Sequence, num_tokens: int) -> int:
        """Bring the draft row to the prompt's first `num_tokens` tokens, as the engine's prefill brings the
        target's (chunk by chunk with it); the first step then catches up with the last prompt token only."""
        if num_tokens <= 0:
            return 0
        state = self._state(seq)
        tokens = seq.prompt_ids[:num_tokens]
        new = self._reconcile(state, tokens)
        _, forwards = forward_chunked(self.model, self.pool.cache, state["row"], new, num_tokens - len(new))
        return forwards

    # ---- drafting ------------------------------------------------------------------------------
    def propose(self, seq: Sequence, num_tokens: int) -> TokenTree:
        return self.propose_batch([seq], [num_tokens])[0]

    def propose_batch(self, seqs: list[Sequence], num_tokens: list[int]) -> list[TokenTree]:
        """Trees for several sequences at once: one batched draft forward per tree level over every
        sequence that still has nodes at that level (rows with the same number of nodes written so far
        go together; a batch of chains is always one group)."""
        shapes = [self.shape_for(k, s.params) for s, k in zip(seqs, num_tokens)]
        active = [i for i, shape in enumerate(shapes) if len(shape) > 0 and self._can_draft(seqs[i])]
        trees = [TokenTree() for _ in seqs]
        if not active:
            return trees
        states = {i: self._state(seqs[i]) for i in active}
        roots, forwards = self._catch_up([states[i] for i in active], [seqs[i] for i in active])
        for i, n in zip(active, forwards):
            seqs[i].metrics.draft_forwards += n
        drafts = {i: self._new_draft(shapes[i], seqs[i], root, num_tokens[i]) for i, root in zip(active, roots)}
        self._grow(seqs, states, drafts)
        for i in active:
            trees[i] = drafts[i].tree(seqs[i].params.greedy)
        return trees

    def _can_draft(self, seq: Sequence) -> bool:
        """Whether a tree can be drafted for `seq` now (else it gets an empty one)."""
        return True

    def _new_draft(self, shape: TreeShape, seq: Sequence, root, num_tokens: int):
        """The tree being drafted for `seq` (`shape`, for a budget of `num_tokens`): `root` is what
        `_catch_up` returned for it (the draft logits)."""
        return _Draft(shape, len(seq.token_ids) - 1, root)

    def _grow(self, seqs: list[Sequence], states: dict, drafts: dict) -> None:
        """Draw the drafts level by level: one batched draft forward per level over every sequence that still
        has nodes to expand (rows with the same number of nodes written so far go together)."""
        for depth in range(1, max(d.num_levels for d in drafts.values()) + 1):
            growing = []
            for i, d in drafts.items():
                if d.done or depth > d.num_levels:
                    d.done = True
                    continue
                if d.draw_level(depth, seqs[i], self.sampling) and depth < d.num_levels:
                    growing.append(i)
                else:
                    d.done = True
            # One draft forward per group of rows with the same number of earlier uncommitted slots.
            groups: dict[int, list[int]] = {}
            for i in growing:
                groups.setdefault(drafts[i].level_start, []).append(i)
            for prior, members in groups.items():
                width = max(len(drafts[i].tokens) - prior for i in members)
                ids = torch.zeros(len(members), width, dtype=torch.long)
                positions = torch.zeros(len(members), width, dtype=torch.long)
                parents = torch.full((len(members), width), -1, dtype=torch.long)
                mask = torch.zeros(len(members), width, prior + width, dtype=torch.bool)
                for b, i in enumerate(members):
                    d = drafts[i]
                    nodes = list(range(prior, len(d.tokens)))
                    written = TokenTree(list(d.tokens), list(d.parents))
                    level_mask = written.attention_mask()[1:, 1:][prior:]  # this level x all nodes so far
                    ids[b, : len(nodes)] = torch.tensor([d.tokens[n] for n in nodes])
                    positions[b, : len(nodes)] = torch.tensor([d.root_position + d.depths[n] for n in nodes])
                    positions[b, len(nodes) :] = d.root_position + depth
                    parents[b, : len(nodes)] = torch.tensor([d.parents[n] for n in nodes])
                    mask[b, : len(nodes), :prior] = level_mask[:, :prior]
                    mask[b, : len(nodes), prior : prior + len(nodes)] = level_mask[:, prior:]
                    states[i]["tree"] = written
                logits, hidden = self._level_forward(
                    [drafts[i] for i in members],
                    ids,
                    positions,
                    parents,
                    mask,
                    rows=[states[i]["row"] for i in members],
                    num_new=[len(drafts[i].tokens) - prior for i in members],
                )
                for b, i in enumerate(members):
                    d = drafts[i]
                    seqs[i].metrics.draft_forwards += 1
                    for j, n in enumerate(range(prior, len(d.tokens))):
                        d.logits_of[n] = logits[b, j]
                        if hidden is not None:
                            d.hidden_of[n] = hidden[b, j]

    def _level_forward(self, drafts, ids, positions, parents, mask, rows, num_new):
        """One draft forward over a level's new nodes (ids [B, T] at `positions`, their tree-node `parents`,
        written after the earlier levels' uncommitted slots): (logits [B, T, V], hidden states or None)."""
        logits = self.model.forward(
            ids, positions, self.pool.cache, tree_mask=mask, extend=True, rows=rows, num_new=num_new
        )
        return logits, None

    def release(self, seq: Sequence) -> None:
        state = seq.proposer_state.pop(self.name, None)
        if state is not None:
            self.pool.release(state["row"])


class _Draft:
    """One sequence's tree while it is drafted: the shape to fill, the nodes drawn so far, the draft
    logits after each node (-1: the root)."""

    def __init__(
        self, shape: TreeShape, root_position: int, root_logits: torch.Tensor, root_hidden: torch.Tensor | None = None
    ):
        self.shape = shape
        self.levels = shape.levels()
        self.num_levels = len(self.levels)
        self.root_position = root_position
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.probs: list[torch.Tensor | None] = []
        self.node_of: dict[int, int] = {-1: -1}  # shape node -> tree node (nodes q cannot fill are dropped)
        self.logits_of: dict[int, torch.Tensor] = {-1: root_logits}
        # a feature-level head's output at each node (its next input), for specgrove.drafting.eagle
        self.hidden_of: dict[int, torch.Tensor | None] = {-1: root_hidden}
        self.level_start = 0
        self.done = False

    def tree(self, greedy: bool) -> TokenTree:
        """The drafted tree, with the q each node was drawn from (none when greedy: deterministic)."""
        return TokenTree(self.tokens, self.parents, None if greedy else torch.stack(self.probs))

    def path_tokens(self, node: int) -> list[int]:
        """The tokens from the root (excluded) to `node` (included; -1: the root, no tokens)."""
        return [self.tokens[n] for n in path_to(node, self.parents.__getitem__)]

    def draw_level(self, depth: int, seq: Sequence, sampling: str) -> bool:
        """Draw the children of the nodes of level `depth`; False when the level came out empty."""
        self.level_start = len(self.tokens)
        by_parent: dict[int, list[int]] = {}
        for node in self.levels[depth - 1]:
            by_parent.setdefault(self.shape.parents[node], []).append(node)
        for shape_parent, shape_children in by_parent.items():
            parent = self.node_of.get(shape_parent)
            if parent is None:
                continue
            # q at `parent` is penalised for the parent's own context (the committed tokens + its path)
            logits = seq.penalised(self.logits_of[parent], self.path_tokens(parent))
            drawn = draw_children(logits, len(shape_children), seq.params, seq.sampler, sampling)
            for shape_child, (token, q) in zip(shape_children, drawn):
                self.node_of[shape_child] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(depth)
                self.probs.append(q)
        return len(self.tokens) > self.level_start
