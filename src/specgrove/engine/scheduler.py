"""Continuous batching: requests join and leave at every step.

Each `Scheduler.step()`:
  1. admits waiting requests while a cache row is free (at most `max_num_seqs` run; each row holds
     max_model_len positions, so memory is bounded by max_num_seqs x max_model_len) and prefills them;
  2. asks the speculation policy for every running request's proposal length k (0 = plain step);
  3. runs `SpecEngine.step_batch` over all running requests: one batched draft phase, one target forward;
  4. hands back the new tokens of every request and retires the finished ones.

The scheduler keeps each live request's times (`RequestTimes`: arrival, first token, finish) and hands
them out with its step outputs; when a request leaves (finished, failed or aborted) it drops them and
tells the policy (`Policy.release`).

The waiting queue is bounded (`max_waiting` requests beyond the free rows of the batch; 0: none waits, a
request a free row takes is still served); `add` raises `QueueFullError` beyond it, which the server
turns into HTTP 429. A failure inside one request (in prefill, drafting, the forward or verification)
finishes that request with finish_reason "error" and its message; the others go on.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from specgrove.engine.engine import SpecEngine
from specgrove.engine.policy import FixedPolicy
from specgrove.engine.sequence import Sequence
from specgrove.errors import SpecgroveError


class QueueFullError(SpecgroveError):
    """The scheduler's waiting queue is full; retry later."""


@dataclass
class RequestTimes:
    """A request's perf_counter times: added, first token generated, finished (None until then; a failed
    request has no finish time)."""

    arrival: float
    first_token: float | None = None
    finish: float | None = None


@dataclass
class StepOutput:
    seq: Sequence
    new_token_ids: list[int]
    finished: bool
    times: RequestTimes


class Scheduler:
    def __init__(self, engine: SpecEngine, policy=None, max_num_seqs: int = 8, max_waiting: int = 64):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.policy = policy if policy is not None else FixedPolicy(engine.num_speculative_tokens)
        limit = engine.pool.max_rows  # the engine's own bound (1 for the transformers fallback)
        self.max_num_seqs = max_num_seqs if limit is None else min(max_num_seqs, limit)
        if limit is None or limit > max_num_seqs:
            engine.pool.max_rows = max(max_num_seqs, engine.pool.in_use)
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.times: dict[str, RequestTimes] = {}  # every waiting or running request's, by request id
        self.steps = 0

    # ---- requests --------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        """Rows of the running batch no running request holds: that many waiting requests are admitted at the
        next step, so they do not count against `max_waiting`."""
        return max(0, self.max_num_seqs - len(self.running))

    def add(self, seq: Sequence, bounded: bool = True) -> None:
        """Queue `seq`. `bounded=False`: the caller already counted it against max_waiting (the server's
        submit, under its lock), so it is queued even if a prefill in flight makes the count differ now."""
        if bounded and len(self.waiting) + 1 - self.free_rows > self.max_waiting:
            raise QueueFullError(
                f"{len(self.waiting)} requests are already waiting (max_waiting={self.max_waiting}); retry later"
            )
        if seq.request_id in self.times:
            raise ValueError(f"request id {seq.request_id!r} is already waiting or running; give each request its own")
        self.times[seq.request_id] = RequestTimes(arrival=time.perf_counter())
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request (e.g. its client went away); True if it was found."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish_reason = "abort"
                self._release(seq)
                return True
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                seq.finish_reason = "abort"
                self.engine.finish(seq)
                self._release(seq)
                return True
        return False

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: Sequence) -> RequestTimes:
        """The request leaves: the policy forgets it; its times go out with its last output."""
        self.policy.release(seq)
        return self.times.pop(seq.request_id)

    # ---- one step --------------------------------------------------------------------------------
    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.finish_reason = "error"
        seq.error = f"{type(error).__name__}: {error}"
        try:
            self.engine.finish(seq)
        except Exception:  # the request is failed already; never let cleanup take the server down
            seq.target_cache = None

    def _admit(self, outputs: list[StepOutput]) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            try:
                self.engine.prefill(seq)
            except Exception as error:
                self._fail(seq, error)
                outputs.append(StepOutput(seq, [], True, self._release(seq)))
                continue
            self.running.append(seq)

    def _run(self, seqs: list[Sequence]) -> dict[int, list[int]]:
        """step_batch over seqs; if it fails, each sequence alone, so only the failing ones fail."""
        ks = self.policy.choose(seqs, self.engine)
        try:
            appended = self.engine.step_batch(seqs, ks)
            return {id(s): a for s, a in zip(seqs, appended)}
        except Exception as batch_error:
            if len(seqs) == 1:
                self._fail(seqs[0], batch_error)
                return {}
        out = {}
        for seq, k in zip(seqs, ks):
            try:
                out[id(seq)] = self.engine.step_batch([seq], [k])[0]
            except Exception as error:
                self._fail(seq, error)
        return out

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self._admit(outputs)
        if not self.running:
            return outputs
        batch = list(self.running)
        appended = self._run(batch)
        self.policy.observe(batch)
        self.steps += 1
        now = time.perf_counter()
        still = []
        for seq in batch:
            new = appended.get(id(seq), [])
            times = self.times[seq.request_id]
            if new and times.first_token is None:
                times.first_token = now
            if seq.finish_reason == "error":
                outputs.append(StepOutput(seq, new, True, self._release(seq)))
                continue
            if seq.finished:
                self.engine.finish(seq)
                times.finish = now
                outputs.append(StepOutput(seq, new, True, self._release(seq)))
            else:
                still.append(seq)
                outputs.append(StepOutput(seq, new, False, times))
        self.running = still
        return outputs

    def run_to_completion(self) -> None:
        while self.has_unfinished:
            self.step()
