"""SamplingParams and the one routine that turns logits into the processed distribution.

The draft and the target both go through `process_logits` with the same parameters, so the draft's q
and the target's p live on the same support and speculative sampling stays exact at any setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# The smallest temperature above 0 accepted: logits / temperature must stay far inside float32's range
# (|logits| reach ~1e2, float32 ends at 3.4e38) so the softmax is a distribution, not NaN; 1e-4 leaves room
# for any logits a model gives. 0 is greedy.
MIN_TEMPERATURE = 1e-4
# The largest: beyond it the distribution is uniform to within 1% for any logits a model gives (and a float32
# temperature of inf would turn a logit of -inf, which the filters and penalties produce, into NaN).
MAX_TEMPERATURE = 1e4
# The repetition penalty multiplies or divides logits: within these bounds they stay far inside float32's range
# (larger ones made every seen token's logit -inf or its division overflow, and the softmax NaN).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # the most top log-probabilities recorded per token (OpenAI's chat top_logprobs bound)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's
MAX_N = 16  # independent choices per request (`n`), in the API and the server alike


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Sampling settings, as in vLLM. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 128
    max_new_tokens: int | None = None  # alias of max_tokens (transformers' name); wins when given
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Penalties, as vLLM (`apply_penalties`): repetition on prompt + output tokens, presence and frequency
    # on output tokens only. Under speculation each tree node is penalised for its own path.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Independent choices per prompt, each its own sequence (`choice_params`); with a seed, choice i samples
    # with `choice_seed(seed, i)`.
    n: int = 1
    # Log-probabilities of each emitted token and of the `logprobs` most likely tokens at its position (0: the
    # emitted token's alone; None: not recorded), the target's (`Sequence.logprobs`).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            self.max_tokens = self.max_new_tokens
        self.max_new_tokens = self.max_tokens
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"invalid SamplingParams: {msg}")

        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise bad(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature > MAX_TEMPERATURE:
            raise bad(
                f"temperature {self.temperature} is above {MAX_TEMPERATURE:g}, where sampling is already uniform to "
                "within 1%; use a smaller one"
            )
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise bad(
                f"temperature {self.temperature} is too small to sample from (logits / temperature leave float32's "
                f"range); use 0 for greedy decoding or at least {MIN_TEMPERATURE}"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be an integer >= 1, or 0 / -1 to disable it; got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -MAX_SEED - 1 <= self.seed <= MAX_SEED
        ):
            raise bad(f"seed must be None or an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be a non-empty string or a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad(f"stop_token_ids must be non-negative, got {self.stop_token_ids}")
        if not _is_number(self.repetition_penalty) or not (
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY
        ):
            raise bad(
                f"repetition_penalty must be a number in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] "
                f"(1 = none, above 1 discourages repeats), got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise bad(f"{name} must be a number in [-{MAX_PENALTY}, {MAX_PENALTY}] (0 = none), got {value!r}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise bad(f"n (independent choices per prompt) must be an integer in [1, {MAX_N}], got {self.n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def describe(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded with `seed`: choice 0 keeps it (so n = 1 answers as it
    always did), the others get one derived from it (SHA-256 of "seed/index"), all reproducible. The API and the
    server both derive them here, so choice i of a request is the same wherever it is asked."""
    if seed is None or index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "big") - 2**63


def choice_params(params: SamplingParams) -> list[SamplingParams]:
    """The params of each of a request's `params.n` choices: one sequence each (n = 1), choice i seeded with
    `choice_seed(params.seed, i)`. Without a seed every choice draws from its own fresh generator."""
    return [dataclasses.replace(params, n=1, seed=choice_seed(params.seed, i)) for i in range(params.n)]


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits [..., V] -> the processed distribution [..., V] (fp32) that is sampled from.

    Order as in transformers: temperature, top-k, top-p, min-p. Greedy (temperature 0) gives the
    one-hot distribution of the argmax (first index on ties), so one verifier serves both modes.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if params.top_k > 0 and params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
        drop_sorted = before >= params.top_p  # keep the smallest prefix whose mass reaches top_p
        # never empty: the most likely token stays, also when top_p rounds to 0 in float32 (below ~1e-45)
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    if params.top_p < 1.0 or params.min_p > 0.0:
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_seen: torch.Tensor, output_counts: torch.Tensor
) -> torch.Tensor:
    """Logits [..., V] penalised for a context (vLLM's `apply_penalties`, before temperature and the filters):

      repetition: the logit of every token seen in the prompt or the output is divided by the penalty where
          positive, multiplied where negative (transformers' and vLLM's rule);
      presence, frequency (OpenAI): logit -= presence * [count > 0] + frequency * count, the counts of the
          output tokens only (the prompt does not count, as in vLLM).

    `prompt_seen` [V] bool: the tokens of the prompt; `output_counts` [V]: how often each token occurs in the
    output (generated tokens, and under speculation the drafted tokens on the node's path)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        seen = prompt_seen | (output_counts > 0)
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.frequency_penalty != 0.0:
        logits = logits - params.frequency_penalty * output_counts
    if params.presence_penalty != 0.0:
        logits = logits - params.presence_penalty * (output_counts > 0).float()
    return logits


class TokenCounts:
    """What the penalties of one sequence read: the prompt's tokens and how often each output token occurs, as
    dense [V] tensors (built on first use for each vocabulary size and device: the draft's logits may live
    elsewhere than the target's), brought up to date with the output as it grows.

    `penalise(logits, params, output_ids, path)` penalises logits for the context prompt + output_ids + path,
    where `path` is the drafted tokens from the root to the node whose logits these are (empty at the root), so
    every node of a speculative tree gets the penalties of its own context."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = list(prompt_ids)
        # (V, device) -> [prompt_seen [V] bool, output_counts [V] fp32, how many output tokens are counted]
        self._dense: dict[tuple, list] = {}

    def _counts(self, vocab: int, device: torch.device, output_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._dense.get((vocab, device))
        if entry is None or entry[2] > len(output_ids):  # new, or an output that shrank: count afresh
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[_ids(self.prompt_ids, vocab, device)] = True
            entry = self._dense[(vocab, device)] = [seen, torch.zeros(vocab, device=device), 0]
        if entry[2] < len(output_ids):
            new = _ids(output_ids[entry[2] :], vocab, device)
            entry[1].index_add_(0, new, torch.ones(len(new), device=device))
            entry[2] = len(output_ids)
        return entry[0], entry[1]

    def penalise(
        self, logits: torch.Tensor, params: SamplingParams, output_ids: list[int], path: list[int] | tuple = ()
    ) -> torch.Tensor:
        vocab = logits.shape[-1]
        prompt_seen, output_counts = self._counts(vocab, logits.device, output_ids)
        if path:
            new = _ids(path, vocab, logits.device)
            output_counts = output_counts.index_add(0, new, torch.ones(len(new), device=logits.device))
        return apply_penalties(logits, params, prompt_seen, output_counts)


def _ids(tokens, vocab: int, device) -> torch.Tensor:
    """Token ids as an index tensor, without those outside a vocabulary of `vocab` (a smaller draft's)."""
    return torch.tensor([t for t in tokens if t < vocab], dtype=torch.long, device=device)


class ProcessedRows:
    """The processed distributions of the rows of `logits` [N, V], each computed (`process_logits`) only when
    first indexed: a verification walk visits the root and the accepted path, not every node of the tree, and
    processing a row over the whole vocabulary (softmax, the top-p sort) is not free. `penalise(row, logits)`:
    the row's penalties (each tree node's own context), applied before `process_logits`; None: no penalties."""

    def __init__(
        self,
        logits: torch.Tensor,
        params: SamplingParams,
        penalise: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.logits = logits
        self.params = params
        self.penalise = penalise
        self._rows: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, row: int) -> torch.Tensor:
        if row not in self._rows:
            logits = self.logits[row] if self.penalise is None else self.penalise(row, self.logits[row])
            self._rows[row] = process_logits(logits, self.params)
        return self._rows[row]

    @property
    def rows_processed(self) -> int:
        return len(self._rows)


class Sampler:
    """The randomness a speculative step consumes: categorical draws and biased coins.

    The engine, proposers and verifiers take randomness only through this interface, so a test can
    replace it with an enumerating sampler and compute the exact distribution of a whole step.
    """

    def __init__(self, seed: int | None = None, device: str | torch.device = "cpu"):
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def categorical(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def get_state(self) -> torch.Tensor:
        """The generator's state, for `set_state` (an engine step that fails is undone with it)."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def bernoulli(self, p: float) -> bool:
        if p >= 1.0:
            return True
        if p <= 0.0:
            return False
        return bool(torch.rand((), generator=self.generator, device=self.generator.device).item() < p)
