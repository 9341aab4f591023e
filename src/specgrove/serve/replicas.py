"""`specgrove serve --replicas N`: N engines behind a router on Ray Serve (the `ray` extra).

The application has two deployments:

- **engine** (N replicas): each holds one whole single-process server, its own models, engine thread,
  continuous batching and speculation policy, and the same FastAPI app (`build_server`) as `specgrove serve`
  without Ray. It serves no HTTP itself: `forward` runs one HTTP request through that app in its process
  (`drive`) and streams back the ASGI messages the app sends.
- **router** (`--routers` replicas, default one; no CPU reserved): Ray Serve's HTTP proxy hands it every
  request. It checks the Host header, the API key and the body size (the same `Guard` as the app's, so a
  refused request never takes an engine's row), reads the body and sends the request to an engine replica
  through a `DeploymentHandle`, relaying its messages (`Forwarder`).

Routing. The handle's router (Ray Serve's default) samples two engine replicas at random and picks the one
with fewer requests in flight ("power of two choices"), never one already holding `max_ongoing_requests`.
That is `--max-num-seqs`, so a request reaches an engine only when a cache row is free for it; the rest wait
in the routers' handle queues (at most `--max-waiting` per engine replica in all, split between the routers;
beyond that, 429 with Retry-After, as the single-process server's full queue) and go to whichever replica
frees a row first.

Faults. An engine replica whose process dies is replaced by Ray Serve's controller. The router turns the
death into an answer:
- a request to which the dead replica had sent nothing yet (still prefilling, or sent to it just before it
  died) is sent again, to another replica: the client sees one normal response;
- a stream already begun ends with an error event (OpenAI's error object, then `[DONE]`), so a client knows
  its text is incomplete.
Nothing of one request reaches another's connection: each forward is its own handle call. The engine's
`check_health` also reports an engine whose loop cannot recover, so the controller replaces it. A client
that disconnects cancels the handle call, and the engine aborts the request and frees its row.

Metrics. Every engine replica keeps its own Prometheus registry; `/metrics` through the router answers from
one replica. With `--metrics-port P` replica number i (Ray Serve's rank, 0..N-1, kept by a replacement)
also serves its registry on port P+i of its node, and Prometheus scrapes them all and sums:
`sum without (instance) (specgrove_generated_tokens_total)`.

Attach to a running Ray cluster with `--ray-address ADDRESS` (e.g. `auto` on a node of the cluster); every
node needs specgrove installed in the same Python environment. Without it a local Ray instance is started
on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable

DEPLOYMENT = "specgrove"  # the application's name
ENGINE = "engine"  # the deployments' names
ROUTER = "router"

# what of an HTTP scope an engine replica needs to run the request through its app (all picklable)
FORWARDED_SCOPE = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "root_path",
    "query_string",
    "headers",
    "client",
    "server",
)


async def drive(app, scope: dict, body: bytes) -> AsyncIterator[dict]:
    """Run one HTTP request (its scope and whole body) through the ASGI `app` in this process, yielding each
    message the app sends (`http.response.start`, then `http.response.body`s). When the caller stops
    listening (the generator is closed or cancelled) the app's task is cancelled, as a disconnected client's
    would be, and has ended when the generator has: the server has aborted the request (its row is freed at
    the engine's next step)."""
    messages: asyncio.Queue = asyncio.Queue()
    delivered = False
    gone = asyncio.Event()

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await messages.put(message)

    task = asyncio.ensure_future(app(dict(scope), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    sent = False
    try:
        while (message := await messages.get()) is not None:
            sent = True
            yield message
        if task.exception() is not None:
            if not sent:
                raise task.exception()
            traceback.print_exception(task.exception())  # its error response went out; the trace to the log
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # the app has aborted the request when this returns


def is_replica_failure(error: BaseException) -> bool:
    """An engine replica died or became unreachable (as opposed to an error of the request itself)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(error, (RayActorError, ReplicaUnavailableError))


def is_backpressure(error: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(error, BackPressureError)


class ClientGone(Exception):
    """The client disconnected while its response was being relayed."""


class Forwarder:
    """The router's ASGI app: each HTTP request, body read, goes to `call(scope, body)` (an async iterator of
    the ASGI messages an engine replica's app sends), whose messages are relayed to the client.

    The response's start is held until its first body bytes, so a replica that fails (`is_failure`) before
    sending any leaves the client untouched and the request is sent again, `attempts` times in all; one that
    fails after ends the response: a stream with an error event and `[DONE]` (other responses are sent
    whole, in one message). `is_full(error)`: the engines' queues are full (429 with Retry-After, as the
    single-process server's). A client that disconnects stops the call (its `cancel()`, else closing it)."""

    def __init__(
        self,
        call: Callable[[dict, bytes], AsyncIterator[dict]],
        attempts: int = 3,
        is_failure: Callable[[BaseException], bool] = is_replica_failure,
        is_full: Callable[[BaseException], bool] = is_backpressure,
    ):
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.call = call
        self.attempts = attempts
        self.is_failure = is_failure
        self.is_full = is_full
        self.resent = 0  # requests sent again after a replica failed them

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return  # websockets: not served
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone, or refused by the Guard (413), before the body was read
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        gone = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await self.forward({k: scope[k] for k in FORWARDED_SCOPE if k in scope}, bytes(body), send, gone)
        finally:
            gone.cancel()

    async def forward(self, scope: dict, body: bytes, send, gone: asyncio.Future) -> None:
        from specgrove.serve.app import DONE, RETRY_AFTER_S, error_body, event, send_error

        retry_after = [(b"retry-after", str(RETRY_AFTER_S).encode())]
        failure: BaseException | None = None
        for attempt in range(self.attempts):
            if attempt:
                self.resent += 1
                print(
                    f"[specgrove] router: a replica failed before answering ({failure!r}); sending the request again",
                    file=sys.stderr,
                )
            response = self.call(scope, body)
            start, begun, streaming, complete = None, False, False, False
            try:
                async for message in until_gone(response, gone):
                    if message["type"] == "http.response.start":
                        start = message
                        headers = {bytes(k).lower(): bytes(v) for k, v in message.get("headers", [])}
                        streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                        continue
                    if not begun:
                        await send(start)
                        begun = True
                    await send(message)
                complete = True
                if start is not None and not begun:
                    await send(start)
                    await send({"type": "http.response.body", "body": b""})
                return
            except ClientGone:
                return
            except Exception as error:
                if begun:
                    if streaming:  # the client learns that its text is incomplete
                        reason = f"the replica serving this request failed ({type(error).__name__}); the text is cut"
                        data = (event(error_body(503, reason, "server_error")) + DONE).encode()
                        await send({"type": "http.response.body", "body": data, "more_body": False})
                    else:
                        traceback.print_exception(error)
                    return
                if self.is_full(error):
                    await send_error(send, 429, str(error), "rate_limit_error", retry_after)
                    return
                if not self.is_failure(error):
                    traceback.print_exception(error)
                    await send_error(send, 500, f"internal server error ({type(error).__name__})", "server_error")
                    return
                failure = error
            finally:
                if not complete:
                    stop(response)
        reason = f"no replica could serve this request ({self.attempts} tried; the last: {type(failure).__name__})"
        await send_error(send, 503, reason, "server_error", retry_after)


async def wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_gone(response, gone: asyncio.Future) -> AsyncIterator[dict]:
    """The messages of `response` until it ends; ClientGone as soon as the client is."""
    iterator = response.__aiter__()
    while True:
        following = asyncio.ensure_future(iterator.__anext__())
        try:
            done, _ = await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not following.done():
                following.cancel()  # and its outcome (cancelled, or the call's own cancellation) is not wanted
                following.add_done_callback(lambda task: task.cancelled() or task.exception())
        if following not in done:
            raise ClientGone
        try:
            message = following.result()
        except StopAsyncIteration:
            return
        yield message


def stop(response) -> None:
    """Stop a call whose response is not wanted any more: a Ray Serve response generator is cancelled (the
    replica's `drive` then cancels the app's task); a plain async generator was closed with its last step."""
    cancel = getattr(response, "cancel", None)
    if callable(cancel):
        cancel()


def _engine_class():
    from ray import serve

    class SpecgroveEngine:
        """One server in this replica's process; `forward` runs a request through its app."""

        def __init__(self, build: Callable, metrics_port: int | None, num_threads: int | None):
            if num_threads:
                import torch

                torch.set_num_threads(num_threads)
            self.asgi_app, self.engines = build()
            for engine in self.engines.values():
                engine.start()
            context = serve.get_replica_context()
            self.rank = getattr(context.rank, "rank", context.rank)
            self.metrics_server = None
            if metrics_port is not None:
                from prometheus_client import start_http_server

                registry = next(iter(self.engines.values())).metrics.registry  # one for all its targets
                self.metrics_server, _ = start_http_server(metrics_port + self.rank, registry=registry)

        async def forward(self, scope: dict, body: bytes):
            async for message in drive(self.asgi_app, scope, body):
                yield message

        def check_health(self) -> None:
            """Ray Serve's health check: an engine whose loop is gone for good makes the controller replace
            this replica (a loop that crashed and recovered is healthy)."""
            for name, engine in self.engines.items():
                if engine.started and not engine.healthy:
                    raise RuntimeError(f"specgrove engine of {name!r} not running: {engine.error}")

        def __del__(self):
            for engine in getattr(self, "engines", {}).values():
                engine.stop()
            if getattr(self, "metrics_server", None) is not None:
                self.metrics_server.shutdown()

    return SpecgroveEngine


def _router_class():
    from ray import serve

    @serve.ingress()
    class SpecgroveRouter:
        """The HTTP entry: the Guard, then each request forwarded to an engine replica (`Forwarder`)."""

        def __init__(self, engines, attempts: int, guard: dict):
            from specgrove.serve.app import Guard

            calls = engines.options(stream=True)
            self.forwarder = Forwarder(lambda scope, body: calls.forward.remote(scope, body), attempts)
            self.asgi_app = Guard(self.forwarder, **guard)

        def __serve_build_asgi_app__(self):
            return self.asgi_app

    return SpecgroveRouter


def application(
    build: Callable,
    replicas: int,
    max_num_seqs: int,
    max_waiting: int,
    cpus_per_replica: float = 1,
    num_threads: int | None = None,
    metrics_port: int | None = None,
    api_key: str | None = None,
    allowed_hosts: list[str] | None = None,
    max_body_bytes: int | None = None,
    routers: int = 1,
):
    """The Ray Serve application: `routers` router replicas in front of `replicas` engine replicas, each the
    server `build()` returns (a picklable callable, run in each replica's process). `serve.run(application(...),
    route_prefix="/")` deploys it. `api_key`, `allowed_hosts`, `max_body_bytes`: the routers' checks, as
    `build_app`'s. The `max_waiting` × `replicas` queued requests are split between the routers (each queues
    in its own handle)."""
    from ray import serve

    from specgrove.serve.app import MAX_BODY_BYTES, host_name

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if cpus_per_replica <= 0:
        raise ValueError(f"--replica-cpus must be > 0, got {cpus_per_replica}")
    if routers < 1:
        raise ValueError(f"--routers must be >= 1, got {routers}")
    engines = serve.deployment(
        _engine_class(),
        name=ENGINE,
        num_replicas=replicas,
        max_ongoing_requests=max_num_seqs,
        max_queued_requests=max(1, -(-max_waiting * replicas // routers)),  # per router: each has its own handle
        ray_actor_options={"num_cpus": cpus_per_replica},
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5,
    )
    router = serve.deployment(
        _router_class(),
        name=ROUTER,
        num_replicas=routers,
        # every request in flight or queued for an engine waits in a router, as a coroutine
        max_ongoing_requests=(max_num_seqs + max_waiting) * replicas + 64,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=5,
    )
    hosts = None if allowed_hosts is None or "*" in allowed_hosts else {host_name(h) for h in allowed_hosts}
    guard = {"api_key": api_key or None, "max_body_bytes": max_body_bytes or MAX_BODY_BYTES, "allowed_hosts": hosts}
    return router.bind(engines.bind(build, metrics_port, num_threads), replicas + 1, guard)


def run(
    args: argparse.Namespace, build: Callable, api_key: str | None = None, allowed_hosts: list[str] | None = None
) -> int:
    """`specgrove serve --replicas N`: start (or attach to) Ray, deploy, and serve until interrupted. `build(options)`
    (picklable) makes a replica's (app, {name: engine}) from the serve options, in the replica's process;
    `api_key` and `allowed_hosts` are also checked by the router."""
    import functools
    import signal
    import time

    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError(
            "--replicas and --ray-address need Ray Serve: pip install 'specgrove[ray]' (or 'ray[serve]')"
        ) from None
    cpus = args.replica_cpus or max(1, (os.cpu_count() or 1) // args.replicas)
    threads = args.num_threads or max(1, int(cpus))
    settings = argparse.Namespace(**{**vars(args), "num_threads": threads, "func": None})
    # The handle's router asks each replica for its queue length before sending; a replica whose engine thread
    # keeps the interpreter busy answers in tens of ms, over Ray Serve's default 0.1 s deadline on a loaded CPU.
    # (Read by the router's process: set here, it reaches a local Ray instance's workers.)
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False)
    # Ctrl-C, or SIGTERM (docker stop, systemd, kill), also while deploying: take the deployment down, leave Ray
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = application(
            functools.partial(build, settings),
            args.replicas,
            args.max_num_seqs,
            args.max_waiting,
            cpus_per_replica=cpus,
            num_threads=threads,
            metrics_port=args.metrics_port,
            api_key=api_key,
            allowed_hosts=allowed_hosts,
            max_body_bytes=args.max_body_bytes,
            routers=args.routers,
        )
        serve.run(app, name=DEPLOYMENT, route_prefix="/")
        print(
            f"[specgrove] serving {args.replicas} replicas ({cpus} CPUs, {threads} threads each) behind "
            f"{args.routers} router(s) on "
            f"http://{args.host}:{args.port} through Ray Serve; Ctrl-C stops",
            file=sys.stderr,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
