"""`specgrove serve --replicas N`: N engines behind Ray Serve's HTTP proxy (the `ray` extra).

Each replica is a Ray Serve deployment replica holding one whole single-process server: its own models, engine
thread, continuous batching and speculation policy, and the same FastAPI app (`build_server`) as
`specgrove serve` without Ray, so the API, streaming, errors, API key and limits are the same. Ray Serve's
proxy takes the HTTP traffic and its router picks the replica:

- Routing. Ray Serve's default request router samples two replicas at random and sends the request to
  the one with fewer requests in flight ("power of two choices"), never to one already holding
  `max_ongoing_requests`. That is set to `--max-num-seqs`, so a request reaches a replica only when a
  cache row is free for it; the rest wait in the proxy (up to `--max-waiting` per replica; beyond that,
  the proxy answers 503), and are sent to whichever replica frees a row first.
- Faults. A replica whose process dies is replaced by Ray Serve's controller. Requests it was serving
  fail (a stream already begun just ends: the proxy cannot add an event for a process that is gone);
  requests still waiting in the proxy had not reached it and go to the live replicas. The replica's
  `check_health` also reports an engine whose loop cannot recover, so the controller replaces it.
- Metrics. Every replica keeps its own Prometheus registry; the proxy's `/metrics` answers from one
  replica. With `--metrics-port P` replica number i (Ray Serve's rank, 0..N-1, kept by a
  replacement) also serves its registry on port P+i of its node, and Prometheus scrapes them all and
  sums: `sum without (instance) (specgrove_generated_tokens_total)`.

Attach to a running Ray cluster with `--ray-address ADDRESS` (e.g. `auto` on a node of the cluster); every
node needs specgrove installed in the same Python environment. Without it a local Ray instance is started
on this machine.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

DEPLOYMENT = "specgrove"


def _replica_class():
    from ray import serve

    @serve.ingress()
    class SpecgroveReplica:
        """One server. Ray Serve builds it in the replica's process, then serves its ASGI app."""

        def __init__(self, build: Callable, metrics_port: int | None, num_threads: int | None):
            if num_threads:
                import torch

                torch.set_num_threads(num_threads)
            self.asgi_app, self.engines = build()  # (`app` is Ray Serve's own attribute)
            context = serve.get_replica_context()
            self.rank = getattr(context.rank, "rank", context.rank)
            self.metrics_server = None
            if metrics_port is not None:
                from prometheus_client import start_http_server

                registry = next(iter(self.engines.values())).metrics.registry  # one for all its targets
                self.metrics_server, _ = start_http_server(metrics_port + self.rank, registry=registry)

        def __serve_build_asgi_app__(self):
            return self.asgi_app

        def check_health(self) -> None:
            """Ray Serve's health check: an engine whose loop is gone for good makes the controller replace
            this replica (a loop that crashed and recovered is healthy)."""
            for name, engine in self.engines.items():
                if engine.started and not engine.healthy:
                    raise RuntimeError(f"specgrove engine of {name!r} not running: {engine.error}")

        def __del__(self):
            if getattr(self, "metrics_server", None) is not None:
                self.metrics_server.shutdown()

    return SpecgroveReplica


def application(
    build: Callable,
    replicas: int,
    max_num_seqs: int,
    max_waiting: int,
    cpus_per_replica: float = 1,
    num_threads: int | None = None,
    metrics_port: int | None = None,
):
    """The Ray Serve application: `replicas` copies of the server `build()` returns (a picklable callable, run
    in each replica's process). `serve.run(application(...), route_prefix="/")` deploys it."""
    from ray import serve

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if cpus_per_replica <= 0:
        raise ValueError(f"--replica-cpus must be > 0, got {cpus_per_replica}")
    deployment = serve.deployment(
        _replica_class(),
        name=DEPLOYMENT,
        num_replicas=replicas,
        max_ongoing_requests=max_num_seqs,
        max_queued_requests=max(1, max_waiting * replicas),
        ray_actor_options={"num_cpus": cpus_per_replica},
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5,
    )
    return deployment.bind(build, metrics_port, num_threads)


def run(args: argparse.Namespace, build: Callable) -> int:
    """`specgrove serve --replicas N`: start (or attach to) Ray, deploy, and serve until interrupted. `build(options)`
    (picklable) makes a replica's (app, {name: engine}) from the serve options, in the replica's process."""
    import functools
    import signal
    import sys
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
    # The router asks each replica for its queue length before sending; a replica whose engine thread keeps
    # the interpreter busy answers in tens of ms, over Ray Serve's default 0.1 s deadline on a loaded CPU.
    # (Read by the proxy's process: set here, it reaches a local Ray instance's workers.)
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
        )
        serve.run(app, name=DEPLOYMENT, route_prefix="/")
        print(
            f"[specgrove] serving {args.replicas} replicas ({cpus} CPUs, {threads} threads each) on "
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
