"""The proposer protocol: every drafter turns a sequence into a TokenTree.

A proposer keeps whatever per-sequence state it needs in `seq.proposer_state` (e.g. a draft KV cache)
and reconciles it with `seq.token_ids` at the next `propose` call: the engine never calls back into the
proposer after verification, so data flows one way (proposer -> tree -> target -> verifier -> commit).
"""

from __future__ import annotations

from typing import Protocol

from specgrove.engine.sequence import Sequence
from specgrove.trees.tree import TokenTree


class Proposer(Protocol):
    name: str
    # Optional: `node_rule`, the verifier node rule matching how the proposer draws siblings
    # (specgrove.verify.speculative.NodeRule); the engine uses rejection_select when it is absent.

    def propose(self, seq: Sequence, num_tokens: int) -> TokenTree:
        """Propose at most `num_tokens` draft tokens continuing `seq.token_ids` (may return an empty tree)."""
        ...

    def release(self, seq: Sequence) -> None:
        """Free the per-sequence state of a finished sequence."""
        ...
