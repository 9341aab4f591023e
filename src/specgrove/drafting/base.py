"""The proposer base class: every drafter turns a sequence into a TokenTree.

A proposer keeps whatever per-sequence state it needs in `seq.proposer_state` (e.g. a draft KV cache)
and reconciles it with `seq.token_ids` at the next `propose` call: the engine never calls back into the
proposer after verification, so data flows one way (proposer -> tree -> target -> verifier -> commit).

`Proposer` declares every hook the engine, the speculation policy and the bench use, each with its
default, so a new drafter overrides what it has and nothing is probed with getattr. A drafter is then
registered in `specgrove.drafting.factory.BUILDERS`.
"""

from __future__ import annotations

from collections import Counter

from specgrove.engine.sequence import Sequence
from specgrove.trees.shape import TreeShape
from specgrove.trees.tree import TokenTree
from specgrove.verify.speculative import rejection_select


class Proposer:
    # The proposer's key in `seq.proposer_state`, and its label.
    name: str = "proposer"
    # The draft model it runs (the engine checks that it can batch), or None.
    model = None
    # The verifier's rule at a node, matching how the proposer draws siblings
    # (specgrove.verify.speculative.NodeRule): recursive rejection sampling by default.
    node_rule = staticmethod(rejection_select)
    # Adaptive sorted drafting: how many draft tokens each exit produced; None for other drafters.
    exit_counts: Counter | None = None
    # The target layers whose hidden states the proposer reads (a feature-level draft head), as
    # `LlamaModel.forward(features=...)` takes them: the engine then gets them from its own prefill and
    # verification forwards and appends the committed tokens' to `seq.target_features`. None: no features.
    feature_layers: tuple[int, ...] | None = None

    def propose(self, seq: Sequence, num_tokens: int) -> TokenTree:
        """Propose at most `num_tokens` draft tokens continuing `seq.token_ids` (may return an empty tree)."""
        raise NotImplementedError

    def prefill(self, seq: Sequence, num_tokens: int) -> int:
        """The engine has put `seq.prompt_ids[:num_tokens]` into the target's cache (a chunk at a time when the
        scheduler has a token budget). A proposer with a cache of its own may fill it with the same tokens, so
        that its first `propose` does not run a whole prompt inside a batched step; it returns the forwards it
        ran. Default: nothing (the proposer catches up at its next call, as it reconciles everything else)."""
        return 0

    def propose_batch(self, seqs: list[Sequence], num_tokens: list[int]) -> list[TokenTree]:
        """Trees for several sequences; the default proposes for each in turn (a draft model batches them)."""
        return [self.propose(seq, k) for seq, k in zip(seqs, num_tokens)]

    def shape_for(self, num_tokens: int, params) -> TreeShape:
        """The shape `propose` fills for `num_tokens` at these sampling parameters (the policy's estimate):
        a chain unless the proposer drafts trees."""
        return TreeShape.chain(num_tokens)

    def release(self, seq: Sequence) -> None:
        """Free the per-sequence state of a finished sequence."""
        seq.proposer_state.pop(self.name, None)
