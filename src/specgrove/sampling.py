"""SamplingParams and the one routine that turns logits into the processed distribution.

The draft and the target both go through `process_logits` with the same parameters, so the draft's q
and the target's p live on the same support and speculative sampling stays exact at any setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from specgrove.errors import UnsupportedError

# The smallest temperature above 0 accepted: logits / temperature must stay far inside float32's range
# (|logits| reach ~1e2, float32 ends at 3.4e38) so the softmax is a distribution, not NaN; 1e-4 leaves room
# for any logits a model gives. 0 is greedy.
MIN_TEMPERATURE = 1e-4
MAX_SEED = 2**63 - 1


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
    # Accepted for familiarity; anything but the neutral value cannot be honoured and raises.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1

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
        for name, neutral in (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            if getattr(self, name) != neutral:
                raise UnsupportedError(
                    f"{name}={getattr(self, name)} is not supported: penalties depend on every earlier token and "
                    f"specgrove does not apply them yet. Leave {name} at {neutral}."
                )
        if self.n != 1:
            raise UnsupportedError(f"n={self.n} is not supported; call generate with the prompt repeated instead")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}


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


class ProcessedRows:
    """The processed distributions of the rows of `logits` [N, V], each computed (`process_logits`) only when
    first indexed: a verification walk visits the root and the accepted path, not every node of the tree, and
    processing a row over the whole vocabulary (softmax, the top-p sort) is not free."""

    def __init__(self, logits: torch.Tensor, params: SamplingParams):
        self.logits = logits
        self.params = params
        self._rows: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, row: int) -> torch.Tensor:
        if row not in self._rows:
            self._rows[row] = process_logits(self.logits[row], self.params)
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
