"""A latency model of this machine for SmartSpec's goodput policy, fitted to a measured profile.

Every forward, draft or target, is modelled as linear in the tokens it runs and the context it attends
over (as SmartSpec does):

    time(tokens, context) = a + b * tokens + c * context

tokens = new tokens over all rows of the batch, context = committed positions over all rows. `profile`
measures forwards on this machine over a grid of (rows, tokens per row, context per row) and
`LatencyModel.fit` takes the least-squares coefficients (clamped at >= 0). `specgrove profile` writes
the measurements and the fit as JSON; `GoodputPolicy` reads it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

PROFILE_VERSION = 1


@dataclass
class LinearTime:
    """time(tokens, context) = a + b * tokens + c * context, in seconds."""

    a: float
    b: float
    c: float

    def __call__(self, tokens: float, context: float) -> float:
        return self.a + self.b * tokens + self.c * context

    @classmethod
    def fit(cls, samples: list[dict]) -> "LinearTime":
        """Least squares over samples {"tokens", "context", "seconds"}, coefficients kept >= 0."""
        if len(samples) < 3:
            raise ValueError(f"a latency fit needs at least 3 measurements, got {len(samples)}")
        x = np.array([[1.0, s["tokens"], s["context"]] for s in samples])
        y = np.array([s["seconds"] for s in samples])
        from scipy.optimize import nnls

        coef, _ = nnls(x, y)
        return cls(*(float(v) for v in coef))


@dataclass
class LatencyModel:
    target: LinearTime
    draft: LinearTime | None = None  # None: the proposer costs no model forward (prompt lookup)
    device: str = ""
    samples: dict = field(default_factory=dict)  # the measurements the fit came from

    def target_time(self, tokens: int, context: int) -> float:
        return self.target(tokens, context)

    def draft_time(self, tokens: int, context: int) -> float:
        return 0.0 if self.draft is None else self.draft(tokens, context)

    def save(self, path: str | os.PathLike) -> None:
        data = {"version": PROFILE_VERSION, "device": self.device, "target": asdict(self.target),
                "draft": None if self.draft is None else asdict(self.draft), "samples": self.samples}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyModel":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"latency profile {path} not found; write one with `specgrove profile --out {path}`") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"latency profile {path} is not valid JSON ({error}); rewrite it with `specgrove profile`") from None
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION or "target" not in data:
            raise ValueError(f"{path} is not a specgrove latency profile (version {PROFILE_VERSION}); "
                             f"rewrite it with `specgrove profile`")
        draft = data.get("draft")
        return cls(LinearTime(**data["target"]), None if draft is None else LinearTime(**draft),
                   data.get("device", ""), data.get("samples", {}))


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


def measure(model, rows=(1, 2, 4, 8), tokens_per_row=(1, 2, 4, 8), contexts=(128, 512), repeats: int = 3,
            progress=None) -> list[dict]:
    samples = []
    for b in rows:
        for t in tokens_per_row:
            for c in contexts:
                seconds = time_forward(model, b, t, c, repeats)
                samples.append({"rows": b, "tokens_per_row": t, "context_per_row": c, "tokens": b * t,
                                "context": b * c, "seconds": seconds})
                if progress is not None:
                    progress(samples[-1])
    return samples


def profile(target, draft=None, rows=(1, 2, 4, 8), tokens_per_row=(1, 2, 4, 8), contexts=(128, 512),
            repeats: int = 3, progress=None) -> LatencyModel:
    """Measure target (and draft: one token per row, as drafting runs) forwards and fit the model."""
    with torch.inference_mode():
        target_samples = measure(target, rows, tokens_per_row, contexts, repeats, progress)
        draft_samples = measure(draft, rows, (1, 2), contexts, repeats, progress) if draft is not None else []
    device = str(getattr(target, "device", "cpu"))
    return LatencyModel(LinearTime.fit(target_samples), LinearTime.fit(draft_samples) if draft_samples else None,
                        device, {"target": target_samples, "draft": draft_samples})
