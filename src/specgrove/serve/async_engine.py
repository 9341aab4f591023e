"""The scheduler in a background thread, fed by asyncio request handlers.

`AsyncEngine.submit` checks and enqueues a request and returns a `RequestStream` (an asyncio queue of
`Delta`s); the engine thread runs `Scheduler.step()` while work exists and pushes every request's new
tokens, its text so far and, at the end, its finish reason and usage to that stream. `abort` (a client
that went away) drops the request at the next step boundary and frees its cache row. One request's
failure ends only that request (finish_reason "error"). A crash of the loop itself ends every open request
with an error event, frees their rows and starts the loop again (`restarts`); only a failure of that
recovery leaves the engine unhealthy (503).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field

from specgrove.engine.scheduler import QueueFullError, Scheduler
from specgrove.engine.sequence import Sequence
from specgrove.sampling import SamplingParams
from specgrove.serve.metrics import ServerMetrics


@dataclass
class Delta:
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    seq: Sequence | None = None


@dataclass
class RequestStream:
    request_id: str
    seq: Sequence
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    created: float = field(default_factory=time.time)
    # The request ids of the request's choices not finished yet, one set shared by its n streams: the last
    # choice to finish counts the request's prompt in the metrics (once per request, as usage does).
    open_choices: set[str] = field(default_factory=set)

    def put(self, delta: Delta) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
        except RuntimeError:  # its event loop is closed: nobody reads this stream any more (its abort follows)
            pass


def usage_of(seqs: Sequence | list[Sequence]) -> dict:
    """OpenAI usage plus the request's speculation statistics (the server's counters add up to them). A request
    of n choices (`seqs`, one sequence each) counts its prompt once, as OpenAI's, and sums the rest."""
    seqs = [seqs] if isinstance(seqs, Sequence) else seqs
    completion = sum(len(s.output_ids) for s in seqs)
    steps = sum(len(s.metrics.proposed_per_step) for s in seqs)
    accepted = sum(sum(s.metrics.accepted_per_step) for s in seqs)
    per_position = [
        sum(column) for column in itertools.zip_longest(*(s.metrics.position_accepted for s in seqs), fillvalue=0)
    ]
    return {
        "prompt_tokens": len(seqs[0].prompt_ids),
        "completion_tokens": completion,
        "total_tokens": len(seqs[0].prompt_ids) + completion,
        "speculation": {
            "steps": steps,
            "drafts": sum(1 for s in seqs for p in s.metrics.proposed_per_step if p > 0),
            "draft_tokens": sum(sum(s.metrics.proposed_per_step) for s in seqs),
            "accepted_tokens": accepted,
            "accepted_per_position": per_position,
            # SpecMetrics.mean_accept_length over every step of every choice
            "mean_accept_length": (accepted + steps) / steps if steps else 0.0,
        },
    }


class AsyncEngine:
    def __init__(self, scheduler: Scheduler, metrics: ServerMetrics | None = None):
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._stop = False
        self.error: str | None = None
        self.restarts = 0
        self.last_crash: str | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="specgrove-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # ---- requests (event-loop side) --------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Validate and enqueue; raises ValueError (bad request) or QueueFullError (overload)."""
        return self.submit_many(prompt_ids, [params], [request_id])[0]

    @property
    def capacity(self) -> int:
        """The most sequences the server holds at once: the batch's rows and the waiting queue."""
        return self.scheduler.max_num_seqs + self.scheduler.max_waiting

    def submit_many(
        self, prompt_ids: list[int], params: list[SamplingParams], request_ids: list[str]
    ) -> list[RequestStream]:
        """One sequence per params (the n choices of one request), all or none enqueued; their streams share one
        queue (each Delta names its sequence). Raises ValueError (bad request) or QueueFullError (overload)."""
        if not self.healthy:
            raise RuntimeError(f"the engine is not running: {self.error or 'not started'}")
        seqs = [  # validates, may raise
            self.engine.new_sequence(prompt_ids, p, request_id=rid) for p, rid in zip(params, request_ids)
        ]
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        open_choices = {seq.request_id for seq in seqs}
        streams = [RequestStream(seq.request_id, seq, queue, loop, open_choices=open_choices) for seq in seqs]
        with self._wake:
            if not self.healthy:  # under the lock: a loop that fails from here on sees this stream
                raise RuntimeError(f"the engine is not running: {self.error or 'not started'}")
            # requests the next step admits (free rows) do not wait: only those beyond them count
            waiting = len(self._inbox) + len(self.scheduler.waiting)
            if waiting + len(seqs) - self.scheduler.free_rows > self.scheduler.max_waiting:
                self.metrics.rejected.inc()
                raise QueueFullError(
                    f"the server is at capacity: {waiting} requests are waiting "
                    f"(max_waiting={self.scheduler.max_waiting}); retry later"
                )
            for stream in streams:
                self.streams[stream.request_id] = stream
            self._inbox.extend(seqs)
            self._wake.notify()
        return streams

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    # ---- the engine thread -----------------------------------------------------------------------
    def _drain(self) -> None:
        with self._wake:
            while not (self._inbox or self._aborts or self.scheduler.has_unfinished or self._stop):
                self._wake.wait()
            # Under the lock, so that submit counts these as waiting; it cannot overflow: submit
            # counted the inbox against max_waiting.
            for seq in self._inbox:
                self.scheduler.add(seq, bounded=False)  # submit counted it; never raise in the loop
            self._inbox = []
            aborts, self._aborts = self._aborts, []
        for request_id in aborts:
            if self.scheduler.abort(request_id):
                self.metrics.record_abort(request_id)
            self.streams.pop(request_id, None)

    def _loop(self) -> None:
        """Run the scheduler; if the loop itself breaks, fail every open request, free their rows and go on
        (`restarts` counts it). Only a failure of that recovery leaves the engine unhealthy for good."""
        while True:
            try:
                self._run()
                return
            except Exception as error:
                traceback.print_exc()
                try:
                    self._recover(f"{type(error).__name__}: {error}")
                except Exception as fatal:  # cannot clean up: report unhealthy, fail what is open
                    traceback.print_exc()
                    with self._wake:
                        self.error = f"{type(fatal).__name__}: {fatal} (after {type(error).__name__}: {error})"
                        streams, self.streams = list(self.streams.values()), {}
                    for stream in streams:
                        stream.put(Delta([], True, "error", self.error, stream.seq))
                    return

    def _run(self) -> None:
        while True:
            self._drain()
            self._gauges()
            if self._stop:
                return
            if not self.scheduler.has_unfinished:
                continue
            outputs = self.scheduler.step()
            for out in outputs:
                self.metrics.record_step(out.seq, out.new_token_ids)
                stream = self.streams.get(out.seq.request_id)
                if out.finished:
                    if stream is not None:
                        stream.open_choices.discard(stream.request_id)
                    last_choice = stream is None or not stream.open_choices
                    self.metrics.record_finish(out.seq, out.times, count_prompt=last_choice)
                    self.streams.pop(out.seq.request_id, None)
                if stream is not None:
                    stream.put(Delta(out.new_token_ids, out.finished, out.seq.finish_reason, out.seq.error, out.seq))
            self._gauges()

    def _gauges(self) -> None:
        # a prefilling request holds its row: it is in the batch, and not waiting (as submit counts it)
        self.metrics.running.set(len(self.scheduler.running) + len(self.scheduler.prefilling))
        self.metrics.waiting.set(len(self.scheduler.waiting))

    def _recover(self, error: str) -> None:
        """After a crash of the loop: every open request ends with an error event (none is continued from a
        state the crash may have left half-changed), every row is freed, and the loop starts again."""
        with self._wake:
            streams, self.streams = list(self.streams.values()), {}
            inbox, self._inbox = self._inbox, []
            self._aborts = []
        held = list(self.scheduler.running) + list(self.scheduler.prefilling)
        for seq in held + list(self.scheduler.waiting) + inbox:
            try:
                self.scheduler.abort(seq.request_id)
            except Exception:  # its row may leak; the request still ends with an error
                traceback.print_exc()
            seq.finish_reason, seq.error = "error", f"the engine loop failed and restarted: {error}"
        for stream in streams:
            self.metrics.record_abort(stream.request_id, "error")
            stream.put(Delta([], True, "error", f"the engine loop failed and restarted: {error}", stream.seq))
        self.restarts += 1
        self.last_crash = error
        self.metrics.restarts.inc()
        self._gauges()
