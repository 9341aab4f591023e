"""The state of one request while it is generated.

Only the request lives here; who serves it keeps its own records apart: the scheduler its times
(`scheduler.RequestTimes`), the speculation policy its acceptance estimate, the server its counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specgrove.engine.metrics import SpecMetrics
from specgrove.sampling import SamplingParams, TokenCounts


@dataclass
class TokenLogprob:
    """An emitted token's log-probability under the target and the `params.logprobs` most likely tokens at its
    position with theirs, most likely first. As vLLM's default (`logprobs_mode="raw_logprobs"`), these are the
    raw model's log-softmax: before penalties, temperature, top-k / top-p / min-p."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: object  # specgrove.sampling.Sampler or a test's enumerating sampler
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text: str = ""
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    # Private per-proposer state (e.g. the draft model's KV cache), keyed by the proposer.
    proposer_state: dict = field(default_factory=dict)
    target_cache: object | None = None
    cache_row: int = 0
    # Prompt tokens in its target cache row: the prefill runs a chunk at a time when the scheduler has a token
    # budget, and is done at len(prompt_ids) - 1 (the last prompt token is the first step's root).
    prefilled: int = 0
    # The target's features (`Proposer.feature_layers`) of the tokens in its cache, in order: chunks [n_i, F]
    # appended by the engine after prefill and after each step's commit (all of token_ids but the last, until
    # the proposer takes them: it may remove the chunks it has consumed). Empty unless the proposer asks.
    target_features: list = field(default_factory=list)
    error: str | None = None  # why a request with finish_reason "error" failed
    # What the penalties read (prompt tokens, output counts); None when the params have no penalties.
    token_counts: TokenCounts | None = field(default=None, init=False, repr=False)
    # One entry per output token when `params.logprobs` is set (recorded by the engine as tokens are
    # committed, from the forward that verified them); None otherwise.
    logprobs: list[TokenLogprob] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.params.has_penalties:
            self.token_counts = TokenCounts(self.prompt_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    def penalised(self, logits: torch.Tensor, path: list[int] | tuple = ()) -> torch.Tensor:
        """`logits` [V] after the token_ids + `path` (drafted tokens from the root to the node whose logits these
        are), with this request's penalties for that context; the logits themselves when it has none."""
        if self.token_counts is None:
            return logits
        return self.token_counts.penalise(logits, self.params, self.output_ids, path)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_left(self) -> int:
        """Prompt tokens still to prefill before the sequence can step."""
        return len(self.prompt_ids) - 1 - self.prefilled

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)
