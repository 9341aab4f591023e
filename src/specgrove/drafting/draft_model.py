"""A draft model proposing a chain of k tokens, each sampled from its own processed distribution q
(the same `process_logits` as the target), keeping the q it sampled from for the verifier."""

from __future__ import annotations

import torch

from specgrove.engine.sequence import Sequence
from specgrove.models.loader import LoadedModel
from specgrove.sampling import process_logits
from specgrove.trees.tree import TokenTree


class DraftModelProposer:
    name = "draft_model"

    def __init__(self, draft: LoadedModel, max_model_len: int):
        self.draft = draft
        self.model = draft.model
        self.max_model_len = max_model_len

    def _state(self, seq: Sequence) -> dict:
        state = seq.proposer_state.get(self.name)
        if state is None:
            state = {"cache": self.model.new_cache(1, self.max_model_len), "tokens": []}
            seq.proposer_state[self.name] = state
        return state

    def _catch_up(self, state: dict, tokens: list[int]) -> torch.Tensor:
        """Bring the draft cache to `tokens` (reusing the longest common prefix) and return the logits
        [V] after the last token."""
        cached: list[int] = state["tokens"]
        cache = state["cache"]
        common = 0
        limit = min(len(cached), len(tokens) - 1)  # at least one token must be fed to get logits
        while common < limit and cached[common] == tokens[common]:
            common += 1
        cache.truncate(0, common)
        new = tokens[common:]
        ids = torch.tensor([new], dtype=torch.long)
        positions = torch.arange(common, common + len(new))[None]
        logits = self.model.forward(ids, positions, cache, logits_at="last")
        cache.commit(0)
        state["tokens"] = list(tokens)
        return logits[0, -1]

    def propose(self, seq: Sequence, num_tokens: int) -> TokenTree:
        if num_tokens <= 0:
            return TokenTree()
        state = self._state(seq)
        params = seq.params
        tokens = list(seq.token_ids)
        logits = self._catch_up(state, tokens)
        drafted: list[int] = []
        qs: list[torch.Tensor] = []
        for i in range(num_tokens):
            if params.greedy:
                token = int(logits.argmax())
            else:
                q = process_logits(logits, params)
                token = seq.sampler.categorical(q)
                qs.append(q)
            drafted.append(token)
            if i + 1 < num_tokens:
                cache = state["cache"]
                pos = len(state["tokens"])
                logits = self.model.forward(torch.tensor([[token]]), torch.tensor([[pos]]), cache, logits_at="last")[0, -1]
                cache.commit(0)
                state["tokens"].append(token)
        return TokenTree.chain(drafted, None if params.greedy else torch.stack(qs))

    def release(self, seq: Sequence) -> None:
        seq.proposer_state.pop(self.name, None)
