"""A latency model of this machine for SmartSpec's goodput policy, fitted to a measured profile.

Every forward, draft or target, is modelled from the tokens it runs (over all rows of the batch) and the
context it attends over (committed positions over all rows):

    time(tokens, context) = f(tokens) + c * context

SmartSpec takes f linear (`LinearTime`: a + b * tokens). A forward's time need not grow linearly with its
tokens: oneDNN picks its bf16 kernels by the number of rows, so on some CPUs a forward over 4 tokens is faster
than one over 1 or 2, and a line through the whole grid then mispredicts the 1-token forward badly enough that
speculating never looks worth it (docs/benchmarks.md, "2026-11-26 (morning): serving load test and the latency
model"). `PiecewiseTime` therefore keeps f as measured: the mean time at each measured token count
(context removed), linear between them, the last segment's slope beyond; c is
fitted with a separate intercept per token count (least squares, >= 0). `profile` measures forwards
over a grid of (rows, tokens per row, context per row); `specgrove profile` writes the measurements and
the fit as JSON; `GoodputPolicy` reads it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

PROFILE_VERSION = 2


@dataclass
class LinearTime:
    """time(tokens, context) = a + b * tokens + c * context, in seconds."""

    a: float
    b: float
    c: float

    def __call__(self, tokens: float, context: float) -> float:
        return self.a + self.b * tokens + self.c * context

    @classmethod
    def fit(cls, samples: list[dict]) -> LinearTime:
        """Least squares over samples {"tokens", "context", "seconds"}, coefficients kept >= 0."""
        if len(samples) < 3:
            raise ValueError(f"a latency fit needs at least 3 measurements, got {len(samples)}")
        x = np.array([[1.0, s["tokens"], s["context"]] for s in samples])
        y = np.array([s["seconds"] for s in samples])
        from scipy.optimize import nnls

        coef, _ = nnls(x, y)
        return cls(*(float(v) for v in coef))


@dataclass
class PiecewiseTime:
    """time(tokens, context) = f(tokens) + c * context, f linear between measured token counts."""

    tokens: list[float]
    seconds: list[float]
    c: float

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.seconds) or sorted(self.tokens) != list(self.tokens):
            raise ValueError("a piecewise latency needs increasing token counts, one time each")

    def __call__(self, tokens: float, context: float) -> float:
        xs, ys = self.tokens, self.seconds
        if tokens <= xs[0] or len(xs) == 1:
            base = ys[0]
        elif tokens >= xs[-1]:
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            base = ys[-1] + slope * (tokens - xs[-1])
        else:
            base = float(np.interp(tokens, xs, ys))
        return base + self.c * context

    @classmethod
    def fit(cls, samples: list[dict]) -> PiecewiseTime:
        """c from the within-token-count covariance of time and context (0 <= c <= every sample's time /
        context); f(n) = mean of time - c context."""
        if not samples:
            raise ValueError("a latency fit needs measurements")
        groups: dict[float, list[dict]] = {}
        for sample in samples:
            groups.setdefault(float(sample["tokens"]), []).append(sample)
        num = den = 0.0
        for group in groups.values():
            mc = statistics.fmean(g["context"] for g in group)
            mt = statistics.fmean(g["seconds"] for g in group)
            num += sum((g["context"] - mc) * (g["seconds"] - mt) for g in group)
            den += sum((g["context"] - mc) ** 2 for g in group)
        c = max(0.0, num / den) if den > 0 else 0.0
        # Noise in short timings can make c large enough to push some f(n) below 0; cap it so no
        # measured forward is explained as taking negative time without its context.
        c = min([c] + [g["seconds"] / g["context"] for g in samples if g["context"] > 0])
        xs = sorted(groups)
        ys = [statistics.fmean(g["seconds"] - c * g["context"] for g in groups[x]) for x in xs]
        return cls(xs, ys, c)


FITS = {"piecewise": PiecewiseTime, "linear": LinearTime}


def describe(model) -> str:
    if isinstance(model, LinearTime):
        return f"{model.a * 1000:.1f} ms + {model.b * 1000:.2f} ms/token + {model.c * 1e6:.2f} us/context position"
    points = ", ".join(f"{int(n)}: {t * 1000:.1f}" for n, t in zip(model.tokens, model.seconds))
    return f"ms by tokens {{{points}}} + {model.c * 1e6:.2f} us/context position"


def _time_to_json(model) -> dict:
    if isinstance(model, PiecewiseTime):
        return {"kind": "piecewise", **asdict(model)}
    return {"kind": "linear", **asdict(model)}


def _time_from_json(data: dict):
    data = dict(data)
    kind = data.pop("kind", "linear")
    return PiecewiseTime(**data) if kind == "piecewise" else LinearTime(**data)


@dataclass
class LatencyModel:
    target: LinearTime | PiecewiseTime
    draft: LinearTime | PiecewiseTime | None = None  # None: the proposer costs no model forward (prompt lookup)
    device: str = ""
    samples: dict = field(default_factory=dict)  # the measurements the fit came from

    def target_time(self, tokens: int, context: int) -> float:
        return self.target(tokens, context)

    def draft_time(self, tokens: int, context: int) -> float:
        return 0.0 if self.draft is None else self.draft(tokens, context)

    def save(self, path: str | os.PathLike) -> None:
        data = {
            "version": PROFILE_VERSION,
            "device": self.device,
            "target": _time_to_json(self.target),
            "draft": None if self.draft is None else _time_to_json(self.draft),
            "samples": self.samples,
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyModel:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"latency profile {path} not found; write one with `specgrove profile --out {path}`"
            ) from None
        except json.JSONDecodeError as error:
            raise ValueError(
                f"latency profile {path} is not valid JSON ({error}); rewrite it with `specgrove profile`"
            ) from None
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION or "target" not in data:
            raise ValueError(
                f"{path} is not a specgrove latency profile (version {PROFILE_VERSION}); "
                f"rewrite it with `specgrove profile`"
            )
        draft = data.get("draft")
        try:
            return cls(
                _time_from_json(data["target"]),
                None if draft is None else _time_from_json(draft),
                data.get("device", ""),
                data.get("samples", {}),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{path}: a malformed latency model ({error}); rewrite it with `specgrove profile`"
            ) from None


def time_forward(model, rows: int, tokens_per_row: int, context: int, repeats: int = 3) -> float:
    """Median seconds of one forward of `rows` rows x `tokens_per_row` new tokens after `context`
    committed positions per row (the cache contents do not change the cost)."""
    cache = model.new_cache(rows, context + tokens_per_row)
    for r in range(rows):
        cache.lengths[r] = context
    ids = torch.randint(0, model.vocab_size, (rows, tokens_per_row))
    positions = (context + torch.arange(tokens_per_row))[None].expand(rows, -1)
    sync = torch.cuda.synchronize if str(model.device).startswith("cuda") else (lambda: None)
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        model.forward(ids, positions, cache, rows=list(range(rows)), logits_at="all")
        sync()
        times.append(time.perf_counter() - start)
        cache.pending = [0] * rows
    return statistics.median(times[1:])


def measure(
    model, rows=(1, 2, 4, 8), tokens_per_row=(1, 2, 4, 8), contexts=(128, 512), repeats: int = 3, progress=None
) -> list[dict]:
    samples = []
    for b in rows:
        for t in tokens_per_row:
            for c in contexts:
                seconds = time_forward(model, b, t, c, repeats)
                samples.append(
                    {
                        "rows": b,
                        "tokens_per_row": t,
                        "context_per_row": c,
                        "tokens": b * t,
                        "context": b * c,
                        "seconds": seconds,
                    }
                )
                if progress is not None:
                    progress(samples[-1])
    return samples


def profile(
    target,
    draft=None,
    rows=(1, 2, 4, 8),
    tokens_per_row=(1, 2, 4, 8),
    contexts=(128, 512),
    repeats: int = 3,
    progress=None,
    fit: str = "piecewise",
) -> LatencyModel:
    """Measure target (and draft: one and two tokens per row, as drafting runs) forwards and fit the
    model: "piecewise" (default) or SmartSpec's "linear"."""
    if fit not in FITS:
        raise ValueError(f"latency fit is one of {', '.join(FITS)}, got {fit!r}")
    kind = FITS[fit]
    with torch.inference_mode():
        target_samples = measure(target, rows, tokens_per_row, contexts, repeats, progress)
        draft_samples = measure(draft, rows, (1, 2), contexts, repeats, progress) if draft is not None else []
    device = str(getattr(target, "device", "cpu"))
    return LatencyModel(
        kind.fit(target_samples),
        kind.fit(draft_samples) if draft_samples else None,
        device,
        {"target": target_samples, "draft": draft_samples},
    )
