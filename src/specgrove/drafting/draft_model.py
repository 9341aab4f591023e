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

from specgrove.engine.sequence import Sequence
from specgrove.models.loader import LoadedModel
from specgrove.sampling import SamplingParams, process_logits
from specgrove.trees.shape import TreeShape
from specgrove.trees.tree import TokenTree
from specgrove.verify.multidraft import draw_hub_pair, spechub_select
from specgrove.verify.speculative import rejection_select

SAMPLING_MODES = ("without_replacement", "iid", "hub")


def draw_children(logits: torch.Tensor, count: int, params, sampler, sampling: str = "without_replacement"
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


class DraftModelProposer:
    name = "draft_model"

    def __init__(self, draft: LoadedModel, max_model_len: int,
                 shape: TreeShape | Callable[[SamplingParams], TreeShape] | None = None,
                 sampling: str = "without_replacement"):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sibling sampling {sampling!r} is unknown; use one of {', '.join(SAMPLING_MODES)}")
        if shape is not None and not draft.model.supports_trees and not (isinstance(shape, TreeShape) and shape.is_chain()):
            raise ValueError(f"token trees need a Llama-family draft model; {draft.name} runs chains only")
        self.draft = draft
        self.model = draft.model
        self.max_model_len = max_model_len
        # None: a chain of whatever length the engine asks for; a callable: a shape per sampling setting
        # (the "auto" tree, tuned per setting).
        self.shape = shape
        self.sampling = sampling
        # the verifier that goes with the way children are drawn (the engine asks for it)
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
            # tokens: what the cache has committed; tree: the nodes written as uncommitted slots last time.
            state = {"cache": self.model.new_cache(1, self.max_model_len), "tokens": [], "tree": TokenTree()}
            seq.proposer_state[self.name] = state
        return state

    def _catch_up(self, state: dict, tokens: list[int]) -> torch.Tensor:
        """Bring the draft cache to `tokens` and return the draft logits [V] after the last one.

        The accepted path of the last tree is kept from the uncommitted slots; the rest of the new
        tokens (at least one, to get logits) go through one forward."""
        cached: list[int] = state["tokens"]
        cache = state["cache"]
        if len(cached) < len(tokens) and tokens[: len(cached)] == cached:
            # Walk the last tree along the new tokens (never the last one: its logits are needed).
            written: TokenTree = state["tree"]
            path, node = [], -1
            for token in tokens[len(cached) : len(tokens) - 1]:
                node = next((c for c in written.children(node) if written.tokens[c] == token), None)
                if node is None:
                    break
                path.append(node)
            cache.commit(0, path)
            common = len(cached) + len(path)
        else:
            common = 0
            limit = min(len(cached), len(tokens) - 1)
            while common < limit and cached[common] == tokens[common]:
                common += 1
            cache.truncate(0, common)
        new = tokens[common:]
        logits = self.model.forward(torch.tensor([new]), torch.arange(common, len(tokens))[None], cache, logits_at="last")
        cache.commit(0)
        state["tokens"] = list(tokens)
        state["tree"] = TokenTree()
        return logits[0, -1]

    # ---- drafting ------------------------------------------------------------------------------
    def propose(self, seq: Sequence, num_tokens: int) -> TokenTree:
        shape = self.shape_for(num_tokens, seq.params)
        if len(shape) == 0:
            return TokenTree()
        state = self._state(seq)
        tokens = list(seq.token_ids)
        root_logits = self._catch_up(state, tokens)
        cache = state["cache"]
        root_position = len(tokens) - 1

        out_tokens: list[int] = []
        out_parents: list[int] = []
        out_depths: list[int] = []
        out_probs: list[torch.Tensor | None] = []
        node_of: dict[int, int] = {-1: -1}  # shape node -> tree node (nodes q cannot fill are dropped)
        logits_of: dict[int, torch.Tensor] = {-1: root_logits}  # tree node -> draft logits after it
        levels = shape.levels()
        for depth, level in enumerate(levels, start=1):
            level_start = len(out_tokens)
            by_parent: dict[int, list[int]] = {}
            for node in level:
                by_parent.setdefault(shape.parents[node], []).append(node)
            for shape_parent, shape_children in by_parent.items():
                parent = node_of.get(shape_parent)
                if parent is None:
                    continue
                drawn = draw_children(logits_of[parent], len(shape_children), seq.params, seq.sampler, self.sampling)
                for shape_child, (token, q) in zip(shape_children, drawn):
                    node_of[shape_child] = len(out_tokens)
                    out_tokens.append(token)
                    out_parents.append(parent)
                    out_depths.append(depth)
                    out_probs.append(q)
            if depth == len(levels) or len(out_tokens) == level_start:
                break
            # One draft forward over this level: its nodes see the committed tokens and their ancestors.
            written = TokenTree(list(out_tokens), list(out_parents))
            level_nodes = list(range(level_start, len(out_tokens)))
            mask = written.attention_mask()[1:, 1:][level_start:]  # rows: this level; columns: all nodes so far
            positions = torch.tensor([[root_position + out_depths[n] for n in level_nodes]])
            logits = self.model.forward(torch.tensor([[out_tokens[n] for n in level_nodes]]), positions, cache,
                                        tree_mask=mask[None], extend=True)[0]
            for i, n in enumerate(level_nodes):
                logits_of[n] = logits[i]
            state["tree"] = written

        draft_probs = None if seq.params.greedy else torch.stack(out_probs)
        return TokenTree(out_tokens, out_parents, draft_probs)

    def release(self, seq: Sequence) -> None:
        seq.proposer_state.pop(self.name, None)
