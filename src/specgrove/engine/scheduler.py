"""Continuous batching: requests join and leave at every step.

Each `Scheduler.step()`:
  1. admits waiting requests while a cache row is free (at most `max_num_seqs` hold rows; each row holds
     max_model_len positions, so memory is bounded by max_num_seqs x max_model_len): they are `prefilling`;
  2. prefills them in arrival order: whole prompts, or with `max_num_batched_tokens` (chunked prefill, as
     vLLM's `enable_chunked_prefill`) at most that many prompt tokens over all of them this step, so that a
     long prompt is spread over several steps instead of stalling the running batch for its whole prefill.
     A request whose prompt is done joins the running batch (this step's decode included);
  3. asks the speculation policy for every running request's proposal length k (0 = plain step);
  4. runs `SpecEngine.step_batch` over all running requests: one batched draft phase, one target forward;
  5. hands back the new tokens of every request and retires the finished ones.

The budget counts prompt tokens only: the decode step is a forward of its own here (vLLM puts prefill chunks
and decode tokens in one forward and counts both). Outputs do not depend on it: a prompt prefilled in chunks
puts the same keys and values in the cache (the runtime is batch invariant) and uses no randomness.

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
    def __init__(
        self,
        engine: SpecEngine,
        policy=None,
        max_num_seqs: int = 8,
        max_waiting: int = 64,
        max_num_batched_tokens: int | None = None,
    ):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1 (or None: whole prompts), got {max_num_batched_tokens}"
            )
        self.engine = engine
        self.policy = policy if policy is not None else FixedPolicy(engine.num_speculative_tokens)
        limit = engine.pool.max_rows  # the engine's own bound (1 for the transformers fallback)
        self.max_num_seqs = max_num_seqs if limit is None else min(max_num_seqs, limit)
        if limit is None or limit > max_num_seqs:
            engine.pool.max_rows = max(max_num_seqs, engine.pool.in_use)
        self.max_waiting = max_waiting
        self.max_num_batched_tokens = max_num_batched_tokens  # prompt tokens prefilled per step; None: all
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted (a row is theirs), prompt not all in the cache yet
        self.running: list[Sequence] = []
        self.times: dict[str, RequestTimes] = {}  # every waiting, prefilling or running request's, by id
        self.steps = 0

    # ---- requests --------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        """Rows of the batch no running or prefilling request holds: that many waiting requests are admitted at
        the next step, so they do not count against `max_waiting`."""
        return max(0, self.max_num_seqs - len(self.running) - len(self.prefilling))

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
        for batch in (self.prefilling, self.running):
            for seq in batch:
                if seq.request_id == request_id:
                    batch.remove(seq)
                    seq.finish_reason = "abort"
                    self.engine.finish(seq)
                    self._release(seq)
                    return True
        return False

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

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

    def _admit(self) -> None:
        """Waiting requests take the free rows, in arrival order (the cache row itself at their first chunk).
        A prefilling request holds its row from here on, so the server's count of waiting requests stays right
        for the whole prefill (only while a request moves from one list to the other may a count read from another
        thread be off by it; the server's `add(bounded=False)` tolerates that)."""
        while self.waiting and self.free_rows > 0:
            self.prefilling.append(self.waiting.popleft())

    def _prefill(self, outputs: list[StepOutput]) -> None:
        """Spend this step's prompt-token budget on the prefilling requests, in arrival order; those whose
        prompt is done join the running batch. A request whose chunk fails fails alone."""
        budget = self.max_num_batched_tokens
        for seq in list(self.prefilling):
            if budget == 0 and seq.prefill_left > 0:
                continue  # a one-token prompt behind it costs nothing and still joins
            try:
                count = self.engine.prefill(seq, budget)
            except Exception as error:
                self.prefilling.remove(seq)
                self._fail(seq, error)
                outputs.append(StepOutput(seq, [], True, self._release(seq)))
                continue
            if budget is not None:
                budget -= count
            if seq.prefill_left == 0:
                self.prefilling.remove(seq)
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
        self._admit()
        self._prefill(outputs)
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
