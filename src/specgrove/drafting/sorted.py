"""Drafting with a sorted (nested) draft model, S2D (Kavehzadeh et al. 2024).

A sorted draft (specgrove.models.sorted) has exits l_1 < l_2 < ... < l_m: sub-model l_i is its first
l_i layers with the shared final norm and output layer. Two ways to draft with it:

  fixed exit l: the sub-model of l layers is an ordinary (shallower) draft model, so it drafts chains
      and any token tree through `DraftModelProposer` (`SortedDraftProposer.fixed(...)`);
  adaptive (S2D): for each draft token run the smallest exit; if its confidence (the largest softmax
      probability of that exit's logits at temperature 1) reaches the exit's threshold, the token is
      drawn from that exit; otherwise only the extra layers up to the next exit run, from the cached
      hidden state. The last exit always emits. Chains only.

Exactness: the drafted token is drawn from q = process_logits(logits of the exit used), and that q is
what the tree records; which exit is used is a deterministic function of the context, so every node's
recorded q is the distribution its token was really drawn from, and the verifier stays exact.

Lazily filled KV. A token that exited at layer e leaves layers e.. of its keys and values unwritten. The
cache therefore keeps, per layer l, the length F_l of the prefix of positions whose layer-l KV is
written (F_0 >= F_1 >= ...), and for every position the hidden state after the deepest layer computed
for it. When a token at position t must run layer l, the positions F_l..t-1 that stopped below l run
layer l with it, as one chunk (causal mask), so a layer always attends over a complete prefix. Rolling
back rejected draft tokens is F_l <- min(F_l, n) for every layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq

import torch

from specgrove.drafting.base import Proposer
from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.engine.sequence import Sequence
from specgrove.models.loader import LoadedModel
from specgrove.models.sorted import SortedSpec
from specgrove.sampling import SamplingParams, process_logits
from specgrove.trees.shape import TreeShape
from specgrove.trees.tree import TokenTree


def sorted_spec(draft: LoadedModel) -> SortedSpec:
    """The draft's exits and thresholds: its sorted.json, or one exit at its full depth."""
    spec = SortedSpec.load(draft.path) if draft.path is not None else None
    if spec is None:
        spec = SortedSpec([draft.model.config.num_layers], [0.0], source=str(draft.path))
    if spec.depth != draft.model.config.num_layers:
        raise ValueError(
            f"{draft.path}: sorted.json's deepest exit is {spec.depth} but the model has "
            f"{draft.model.config.num_layers} layers"
        )
    return spec


def confidence(logits: torch.Tensor) -> float:
    """Largest softmax probability of the logits at temperature 1 (S2D's exit criterion)."""
    return float(torch.softmax(logits.float(), -1).max())


class LayeredCache:
    """A draft KV cache whose layers are filled to different depths (see the module docstring)."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.kv = model.new_cache(1, max_len)
        self.filled = [0] * model.config.num_layers  # F_l
        self.hidden = torch.zeros(max_len, model.config.hidden_size, dtype=model.dtype, device=model.device)
        self.tokens: list[int] = []
        self.max_len = max_len

    def truncate(self, n: int) -> None:
        self.filled = [min(f, n) for f in self.filled]
        del self.tokens[n:]

    def depth_of(self, position: int) -> int:
        """Layers computed for a position (the filled prefixes are non-increasing in the layer)."""
        return sum(f > position for f in self.filled)

    def append(self, tokens: Seq[int]) -> None:
        """New positions, embedded (depth 0), no layer computed yet."""
        if not tokens:
            return
        start = len(self.tokens)
        if start + len(tokens) > self.max_len:
            raise ValueError(f"the draft cache holds {self.max_len} positions; {start + len(tokens)} are needed")
        self.hidden[start : start + len(tokens)] = self.model.embed_tokens(torch.tensor(tokens))
        self.tokens.extend(tokens)

    @torch.inference_mode()
    def run_to(self, depth: int) -> torch.Tensor:
        """Compute the last position up to `depth` layers (filling earlier positions where they stop short)
        and return its hidden state."""
        t = len(self.tokens) - 1
        device = self.model.device
        prepared = {}  # chunk start -> positions, RoPE, cache rows, mask (shared by the layers that start there)
        for layer in range(self.depth_of(t), depth):
            start = self.filled[layer]
            if start not in prepared:
                positions = torch.arange(start, t + 1, device=device)
                mask = (torch.arange(t + 1, device=device)[None, :] <= positions[:, None])[
                    None, None
                ]  # [1, 1, T, t + 1]
                prepared[start] = (
                    positions[None],
                    self.model.rope(positions[None]),
                    torch.zeros(1, len(positions), dtype=torch.long, device=device),
                    self.model.fold_groups(mask),
                )
            positions, rope, write_rows, mask = prepared[start]
            h = self.model.layer_forward(
                layer, self.hidden[start : t + 1][None], rope, self.kv, write_rows, positions, mask, t + 1
            )
            self.hidden[start : t + 1] = h[0]
            self.filled[layer] = t + 1
        return self.hidden[t]


class SortedDraftProposer(Proposer):
    """Adaptive S2D drafting of a chain (see the module docstring). `exit_counts` counts the exit each
    draft token came from, over the proposer's life."""

    name = "sorted"

    def __init__(
        self,
        draft: LoadedModel,
        max_model_len: int,
        thresholds: Seq[float] | None = None,
        exits: Seq[int] | None = None,
        target: str | None = None,
    ):
        if not draft.is_fast:
            raise ValueError(f"a sorted draft needs the fast runtime (Llama family); {draft.name} is not")
        spec = sorted_spec(draft)
        self.exits = list(exits) if exits is not None else spec.exits
        if any(e not in spec.exits for e in self.exits) or self.exits != sorted(set(self.exits)):
            raise ValueError(f"exits {self.exits} must be increasing and among the draft's exits {spec.exits}")
        if thresholds is None:  # those measured for this target (by name), else the draft's
            by_exit = dict(zip(spec.exits, spec.thresholds_for(target)))
            thresholds = [by_exit[e] for e in self.exits]
        self.thresholds = [float(t) for t in thresholds]
        if len(self.thresholds) != len(self.exits) or any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"one threshold in [0, 1] per exit {self.exits}, got {list(thresholds)}")
        self.draft = draft
        self.model = draft.model
        self.max_model_len = max_model_len
        self.exit_counts: Counter = Counter()

    @classmethod
    def fixed(
        cls, draft: LoadedModel, exit_layer: int, max_model_len: int, shape=None, sampling: str = "without_replacement"
    ) -> DraftModelProposer:
        """A proposer drafting with the sub-model of `exit_layer` layers alone (chains or trees)."""
        spec = sorted_spec(draft)
        if exit_layer not in spec.exits:
            raise ValueError(f"exit {exit_layer} is not one of the draft's exits {spec.exits}")
        sub = LoadedModel(
            **{**draft.__dict__, "model": draft.model.truncated(exit_layer), "name": f"{draft.name}@{exit_layer}"}
        )
        proposer = DraftModelProposer(sub, max_model_len, shape, sampling)
        proposer.name = f"sorted@{exit_layer}"
        return proposer

    def _state(self, seq: Sequence) -> LayeredCache:
        cache = seq.proposer_state.get(self.name)
        if cache is None:
            cache = seq.proposer_state[self.name] = LayeredCache(self.model, self.max_model_len)
        return cache

    def next_logits(self, cache: LayeredCache) -> tuple[torch.Tensor, int]:
        """Logits after the last position from the first exit confident enough (the last exit always)."""
        for i, (exit_layer, threshold) in enumerate(zip(self.exits, self.thresholds)):
            rows = self.model.head_logits(cache.run_to(exit_layer)[None])[0]  # a cut head's rows: same softmax max
            if i == len(self.exits) - 1 or confidence(rows) >= threshold:
                self.exit_counts[exit_layer] += 1
                return self.model.expand_head(rows), exit_layer
        raise AssertionError("unreachable")

    def propose(self, seq: Sequence, num_tokens: int) -> TokenTree:
        if num_tokens <= 0:
            return TokenTree()
        cache = self._state(seq)
        tokens = seq.token_ids
        common = 0
        limit = min(len(cache.tokens), len(tokens))
        while common < limit and cache.tokens[common] == tokens[common]:
            common += 1
        common = min(common, len(tokens) - 1)  # the last token is recomputed from its embedding, exit by exit
        cache.truncate(common)
        cache.append(tokens[common:])
        params: SamplingParams = seq.params
        out_tokens, out_probs = [], []
        for i in range(num_tokens):
            if i:
                cache.append([out_tokens[-1]])
            logits, _ = self.next_logits(cache)
            logits = seq.penalised(logits, out_tokens)  # the chain so far is this node's path
            if params.greedy:
                out_tokens.append(int(torch.argmax(logits)))
                continue
            q = process_logits(logits, params)
            out_tokens.append(seq.sampler.categorical(q))
            out_probs.append(q)
        draft_probs = None if params.greedy else torch.stack(out_probs)
        return TokenTree(out_tokens, list(range(-1, len(out_tokens) - 1)), draft_probs)


def sorted_proposer(
    draft: LoadedModel,
    max_model_len: int,
    exit_layer: int | Seq[int] | None = None,
    thresholds: Seq[float] | None = None,
    shape=None,
    sampling: str = "without_replacement",
    target: str | None = None,
):
    """The proposer for method "sorted": adaptive over every exit (exit_layer None) or over some of them
    (a list of several, e.g. the shallow ones for a small target), drafting chains, with `thresholds` or those
    the draft's sorted.json holds for the model named `target`; or one fixed exit (an int, or a list of one),
    drafting chains or the token tree `shape` (siblings drawn as `sampling` says)."""
    if exit_layer is None or (not isinstance(exit_layer, int) and len(exit_layer) > 1):
        if shape is not None and not (isinstance(shape, TreeShape) and shape.is_chain()):
            raise ValueError("adaptive sorted drafting makes chains; draft a tree with one fixed exit")
        return SortedDraftProposer(draft, max_model_len, thresholds, exit_layer, target)
    return SortedDraftProposer.fixed(
        draft, exit_layer if isinstance(exit_layer, int) else exit_layer[0], max_model_len, shape, sampling
    )
