"""The server's Prometheus metrics (one registry per server, so several can live in one process), every one
labelled `model_name` with the served target (a server of several targets keeps one `ServerMetrics` each).

Counters are monotonic and are fed from the same per-step records as each request's usage
(`async_engine.usage_of`), so summed over requests they agree exactly. A request of n choices runs n
sequences: the per-step counters and the finished requests count each choice, while prompt tokens count the
request's prompt once (when its last choice finishes), as its usage does:
  specgrove_drafts_total                 steps that proposed at least one draft token
  specgrove_draft_tokens_total           draft tokens proposed
  specgrove_accepted_tokens_total        draft tokens accepted
  specgrove_accepted_tokens_per_position_total{position}  accepted tokens at draft depth position (1-based)
  specgrove_steps_total, specgrove_generated_tokens_total, specgrove_prompt_tokens_total
  specgrove_requests_finished_total{finish_reason}, specgrove_requests_rejected_total
Histograms: specgrove_request_latency_seconds (arrival to finish), specgrove_time_to_first_token_seconds.
Gauges: specgrove_requests_running, specgrove_requests_waiting. specgrove_engine_restarts_total counts the
engine loop's recoveries from a crash.
The per-step counters are fed incrementally: `counted_steps` holds, per running request id, how many of
its steps are counted already; a request's entry goes when it finishes or is aborted.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from specgrove.engine.scheduler import RequestTimes
from specgrove.engine.sequence import Sequence

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, float("inf"))


class MetricFamilies:
    """The server's metric families in one registry, every one labelled by `model_name` (the served target),
    as vLLM's: one server holds one per target (`ServerMetrics`) and `/metrics` exposes them all at once."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        name = ["model_name"]
        self.drafts = Counter("specgrove_drafts", "steps that proposed at least one draft token", name, registry=r)
        self.draft_tokens = Counter("specgrove_draft_tokens", "draft tokens proposed", name, registry=r)
        self.accepted_tokens = Counter(
            "specgrove_accepted_tokens", "draft tokens accepted by the target", name, registry=r
        )
        self.accepted_per_position = Counter(
            "specgrove_accepted_tokens_per_position",
            "draft tokens accepted at each draft depth (1-based)",
            [*name, "position"],
            registry=r,
        )
        self.steps = Counter("specgrove_steps", "request steps (one target verification each)", name, registry=r)
        self.generated_tokens = Counter("specgrove_generated_tokens", "tokens generated", name, registry=r)
        self.prompt_tokens = Counter(
            "specgrove_prompt_tokens", "prompt tokens of finished requests (once per request)", name, registry=r
        )
        self.finished = Counter(
            "specgrove_requests_finished", "finished requests", [*name, "finish_reason"], registry=r
        )
        self.rejected = Counter(
            "specgrove_requests_rejected", "requests refused because the queue was full", name, registry=r
        )
        self.latency = Histogram(
            "specgrove_request_latency_seconds",
            "request latency, arrival to finish",
            name,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "specgrove_time_to_first_token_seconds",
            "arrival to first generated token",
            name,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "specgrove_requests_running",
            "requests holding a row of the batch (prefilling or decoding)",
            name,
            registry=r,
        )
        self.waiting = Gauge("specgrove_requests_waiting", "requests waiting for a batch slot", name, registry=r)
        self.restarts = Counter(
            "specgrove_engine_restarts", "times the engine loop failed and was started again", name, registry=r
        )


class ServerMetrics:
    """One served target's metrics: the families' children labelled model_name=<its name>."""

    def __init__(self, model_name: str = "", families: MetricFamilies | None = None):
        self.families = f = families if families is not None else MetricFamilies()
        self.registry = f.registry
        self.model_name = model_name
        for attribute in (
            "drafts",
            "draft_tokens",
            "accepted_tokens",
            "steps",
            "generated_tokens",
            "prompt_tokens",
            "rejected",
            "latency",
            "ttft",
            "running",
            "waiting",
            "restarts",
        ):
            setattr(self, attribute, getattr(f, attribute).labels(model_name))
        self.counted_steps: dict[str, int] = {}  # steps already added to the counters, by request id

    def record_step(self, seq: Sequence, new_token_ids: list[int]) -> None:
        """Count the steps of `seq` not counted yet (normally the one just run)."""
        m = seq.metrics
        done = self.counted_steps.get(seq.request_id, 0)
        for proposed, accepted in zip(m.proposed_per_step[done:], m.accepted_per_step[done:]):
            self.steps.inc()
            if proposed > 0:
                self.drafts.inc()
                self.draft_tokens.inc(proposed)
            if accepted > 0:
                self.accepted_tokens.inc(accepted)
                for position in range(1, accepted + 1):
                    self.families.accepted_per_position.labels(self.model_name, str(position)).inc()
        self.counted_steps[seq.request_id] = len(m.proposed_per_step)
        if new_token_ids:
            self.generated_tokens.inc(len(new_token_ids))

    def record_finish(self, seq: Sequence, times: RequestTimes, count_prompt: bool = True) -> None:
        """A sequence that finished (or failed), after its last `record_step`. `count_prompt`: whether its prompt
        counts (the last of a request's n choices to finish; false for the others, whose prompt is the same)."""
        self.counted_steps.pop(seq.request_id, None)
        self.families.finished.labels(self.model_name, str(seq.finish_reason)).inc()
        if count_prompt:
            self.prompt_tokens.inc(len(seq.prompt_ids))
        if times.finish is not None:
            self.latency.observe(times.finish - times.arrival)
        if times.first_token is not None:
            self.ttft.observe(times.first_token - times.arrival)

    def record_abort(self, request_id: str, reason: str = "abort") -> None:
        """A request the scheduler dropped: its client went away ("abort"), or the engine loop failed under
        it ("error")."""
        self.counted_steps.pop(request_id, None)
        self.families.finished.labels(self.model_name, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
