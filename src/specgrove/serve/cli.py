"""`specgrove serve` and `specgrove profile`."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from specgrove.cli_options import build_llm, model_options, speculative_options
from specgrove.serve.server import allowed_hosts_for, build_targets_server, make_policy, policy_k

# Prompt tokens per step (chunked prefill) when serving: see --max-num-batched-tokens's help.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256


def add_parsers(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching and speculation",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics. "
        "Requests are batched continuously; every step the policy chooses how far to "
        "speculate.",
    )
    model_options(s)
    speculative_options(s)
    s.add_argument(
        "--policy",
        default="goodput",
        help="speculation policy: goodput (SmartSpec; needs --profile) or fixed:K (K = 0 disables "
        "speculation); default goodput",
    )
    s.add_argument(
        "--profile",
        default=None,
        metavar="JSON",
        help="latency profile from `specgrove profile` (goodput policy; default: measured at start-up)",
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1: this machine only; 0.0.0.0 serves every network the machine is "
        "on, so set --api-key)",
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        default=None,
        help="every /v1/ request must send 'Authorization: Bearer KEY' (default: $SPECGROVE_API_KEY, else none)",
    )
    s.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="NAMES",
        help="comma-separated host names (any port) the Host header may name, else HTTP 400; '*' = any. "
        "Default: localhost, 127.0.0.1 and ::1 when --host is a loopback address (a web page on another domain "
        "that resolves to 127.0.0.1 cannot reach the server: DNS rebinding), no check on other addresses. "
        "Behind a reverse proxy that forwards the Host header, give the public name",
    )
    s.add_argument(
        "--max-body-bytes", type=int, default=None, help="larger request bodies get HTTP 413 (default 2 MiB)"
    )
    s.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together (default 8)")
    s.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
        metavar="N",
        help="chunked prefill: at most N prompt tokens are prefilled per scheduler step, between two decode steps "
        "of the running batch, so that a long prompt delays the others' next tokens by one N-token forward at a "
        "time instead of by its whole prefill; 0 = whole prompts. Default "
        f"{DEFAULT_MAX_NUM_BATCHED_TOKENS}: prefill still runs as large forwards (few per prompt, each using "
        "the matmul kernels' many-row path), while a step's stall is a quarter of a 1024-token prompt's. "
        "vLLM's name; decode tokens, which run in a forward of their own here, are not counted",
    )
    s.add_argument(
        "--max-connections", type=int, default=256, help="open connections at most; more get HTTP 503 (default 256)"
    )
    s.add_argument(
        "--max-waiting", type=int, default=64, help="requests queued beyond those; more get HTTP 429 (default 64)"
    )
    s.add_argument("--max-model-len", type=int, default=4096)
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send (default: the target's name); with --targets, one per target, comma-separated",
    )
    s.add_argument(
        "--targets",
        default=None,
        metavar="A,B,...",
        help="serve several targets (instead of --target) with one draft, loaded once and shared; a request's "
        "model picks its target (the first is the default) and /v1/models lists them all",
    )
    s.add_argument(
        "--sorted-draft",
        default=None,
        metavar="DIR",
        help="a sorted draft (S2D) for every target: --draft DIR --method sorted",
    )
    scale = s.add_argument_group("scale-out on Ray Serve (pip install 'specgrove[ray]')")
    scale.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="engines behind Ray Serve's HTTP proxy, each with its own models, batching and policy (default 1: "
        "one process, no Ray)",
    )
    scale.add_argument(
        "--ray-address",
        default=None,
        help="attach to this running Ray cluster (e.g. auto) instead of starting one on this machine; implies Ray "
        "Serve even with --replicas 1",
    )
    scale.add_argument(
        "--replica-cpus",
        type=float,
        default=None,
        help="CPUs Ray reserves for each replica (default: this machine's CPUs / --replicas); also its threads "
        "unless --num-threads",
    )
    scale.add_argument(
        "--routers",
        type=int,
        default=1,
        help="router replicas in front of the engine replicas (default 1); a router relays a few hundred tokens/s "
        "per core (docs/benchmarks.md), so add one per few dozen engine replicas, or a second to keep serving new "
        "requests while one restarts",
    )
    scale.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="replica i also serves its Prometheus metrics on port METRICS_PORT+i of its node (the router's /metrics "
        "answers from one replica)",
    )
    s.set_defaults(func=cmd_serve)

    lt = sub.add_parser(
        "loadtest",
        help="SmartSpec's experiment: Poisson arrivals at several rates against the "
        "server (loopback), per policy; latency, TTFT, tokens/s; JSON + plot",
    )
    model_options(lt)
    speculative_options(lt)
    lt.add_argument(
        "--policies",
        default="fixed:0,fixed:1,fixed:3,fixed:5,goodput",
        help="comma list of policies (fixed:0 = no speculation); default fixed:0,fixed:1,fixed:3,fixed:5,goodput",
    )
    lt.add_argument("--rates", default="0.05,0.1,0.2", help="request rates per second (default 0.05,0.1,0.2)")
    lt.add_argument("--requests", type=int, default=8, help="requests per rate (default 8)")
    lt.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    lt.add_argument("--profile", default=None, metavar="JSON", help="latency profile for the goodput policy")
    lt.add_argument("--max-num-seqs", type=int, default=8)
    lt.add_argument(
        "--max-num-batched-tokens",
        default=None,
        metavar="N[,N...]",
        help="prefill budgets to compare, one server each (0 = whole prompts); default "
        f"{DEFAULT_MAX_NUM_BATCHED_TOKENS} as serve's, or 0,{DEFAULT_MAX_NUM_BATCHED_TOKENS} with --long-requests",
    )
    lt.add_argument(
        "--long-requests",
        type=int,
        default=0,
        help="mixed mode: this many requests with long prompts arrive evenly among the --requests short ones, "
        "whose latency, TTFT and inter-token gaps are then reported apart (default 0)",
    )
    lt.add_argument("--long-prompt-tokens", type=int, default=1024, help="tokens of each long prompt (default 1024)")
    lt.add_argument("--max-model-len", type=int, default=4096)
    lt.add_argument("--data", default=None, help="Spec-Bench question.jsonl (default: as bench)")
    lt.add_argument("--seed", type=int, default=0, help="arrival-time seed (default 0)")
    lt.add_argument("--out", required=True, help="output prefix: OUT.json and OUT.png")
    lt.add_argument(
        "--url",
        default=None,
        help="load a server already running there (e.g. serve --replicas N) with its own policy, instead of "
        "starting one per --policies; no models load here",
    )
    lt.add_argument("--model", default=None, help="with --url: the model to request (default: the server's first)")
    lt.set_defaults(func=cmd_loadtest, num_speculative_tokens=5)

    p = sub.add_parser(
        "profile",
        help="SmartSpec: measure target and draft forward times on this machine and fit "
        "the latency model of the goodput policy",
    )
    model_options(p)
    p.add_argument("--no-draft", action="store_true", help="profile the target only (prompt lookup)")
    p.add_argument("--rows", default="1,2,4,8", help="batch rows to measure (default 1,2,4,8)")
    p.add_argument("--tokens", default="1,2,4,8", help="new tokens per row (default 1,2,4,8)")
    p.add_argument("--contexts", default="128,512", help="context positions per row (default 128,512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--fit",
        choices=("piecewise", "linear"),
        default="piecewise",
        help="latency model: piecewise in tokens as measured (default) or SmartSpec's linear fit",
    )
    p.add_argument("--out", required=True, help="the profile JSON to write")
    p.set_defaults(func=cmd_profile)


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--{name} takes positive integers, got {text!r}")
    return values


def _budgets(text: str) -> list[int]:
    """--max-num-batched-tokens of the load test: comma-separated integers >= 0 (0: whole prompts)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--max-num-batched-tokens takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"--max-num-batched-tokens takes integers >= 0 (0: whole prompts), got {text!r}")
    return values


def target_args(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The options of each target `specgrove serve` serves: --target alone, or each of --targets (names from
    --served-model-name, one per target, or the targets' own); --sorted-draft DIR is --draft DIR --method
    sorted."""
    targets = [t.strip() for t in (args.targets or "").split(",") if t.strip()] or [args.target]
    names = [n.strip() for n in (args.served_model_name or "").split(",") if n.strip()]
    if names and len(names) != len(targets):
        raise ValueError(
            f"--served-model-name gives {len(names)} names for {len(targets)} targets; give one per target"
        )
    if len(set(targets)) != len(targets) or len(set(names)) != len(names):
        raise ValueError("--targets and --served-model-name must not repeat a name")
    settings = vars(args).copy()
    if args.sorted_draft is not None:
        if args.draft is not None:
            raise ValueError("give --draft or --sorted-draft, not both")
        if args.method not in ("draft_model", "sorted"):
            raise ValueError(f"--sorted-draft drafts with method sorted; it does not go with --method {args.method}")
        settings.update(draft=args.sorted_draft, method="sorted")
    return [
        argparse.Namespace(**{**settings, "target": target, "served_model_name": names[i] if names else None})
        for i, target in enumerate(targets)
    ]


def serve_from_args(args: argparse.Namespace, api_key: str | None, allowed_hosts: list[str] | None = None):
    """`specgrove serve`'s app and {model name: AsyncEngine}: every target loaded, the draft loaded once and
    shared by all (each target keeps its own draft state: caches, thresholds, acceptance statistics)."""
    targets, shared_draft = {}, None
    for options in target_args(args):
        if shared_draft is not None:
            options.draft = shared_draft  # LLM takes a loaded draft as is
        llm, _ = build_llm(options, max_num_seqs=args.max_num_seqs)
        shared_draft = shared_draft or llm.draft
        name = options.served_model_name or llm.target.name
        if name in targets:
            raise ValueError(f"two targets are named {name!r}; give --served-model-name, one name per target")
        targets[name] = (llm, make_policy(args.policy, llm, args.profile))
    return build_targets_server(
        targets,
        args.max_num_seqs,
        args.max_waiting,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        allowed_hosts=allowed_hosts,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.max_num_seqs < 1 or args.max_waiting < 0 or args.max_num_batched_tokens < 0:
        raise ValueError("--max-num-seqs must be >= 1, --max-waiting >= 0 and --max-num-batched-tokens >= 0")
    policy_k(args.policy)
    allowed_hosts = allowed_hosts_for(args.host, args.allowed_hosts)
    api_key = args.api_key or os.environ.get("SPECGROVE_API_KEY") or None
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.routers < 1:
        raise ValueError(f"--routers must be >= 1, got {args.routers}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(
            f"[specgrove] warning: serving on {args.host} without --api-key: anyone who can reach this port can "
            "use the model",
            file=sys.stderr,
        )
    if args.replicas > 1 or args.ray_address is not None:
        from specgrove.models.loader import resolve_model_dir
        from specgrove.serve import replicas

        for options in target_args(args):  # a wrong name fails here, not in every replica
            resolve_model_dir(options.target)
        build = functools.partial(serve_from_args, api_key=api_key, allowed_hosts=allowed_hosts)
        return replicas.run(args, build, api_key=api_key, allowed_hosts=allowed_hosts)
    app, engines = serve_from_args(args, api_key, allowed_hosts)
    print(
        f"[specgrove] serving {', '.join(engines)} on http://{args.host}:{args.port} "
        f"(policy {args.policy}, max_num_seqs {args.max_num_seqs} per target, "
        f"prefill {args.max_num_batched_tokens or 'whole prompts'} tokens per step)",
        file=sys.stderr,
    )
    # uvicorn bounds open connections (beyond: 503) and idle keep-alive; it has no timeout for a client that
    # sends its headers slowly, so a server open to untrusted clients belongs behind a reverse proxy.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        limit_concurrency=args.max_connections,
        timeout_keep_alive=5,
    )
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    import json

    from specgrove.serve.loadtest import plot

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--rates takes comma-separated numbers, got {args.rates!r}") from None
    if not policies or not rates or any(r <= 0 for r in rates) or args.requests < 1 or args.max_tokens < 1:
        raise ValueError("--policies and --rates must be non-empty, rates > 0, --requests and --max-tokens >= 1")
    if args.long_requests < 0 or args.long_prompt_tokens < 1:
        raise ValueError("--long-requests must be >= 0 and --long-prompt-tokens >= 1")
    if args.url is not None:
        from specgrove.serve.loadtest import run_remote_loadtest

        report = run_remote_loadtest(
            args.url, args.model, rates, args.requests, args.max_tokens, args.seed, args.data, log=_log
        )
    else:
        fixed = [k for k in (policy_k(p) for p in policies) if k is not None]
        args.num_speculative_tokens = max([args.num_speculative_tokens, *fixed])
        llm, _ = build_llm(args, max_num_seqs=args.max_num_seqs)
        report = _local_loadtest(args, llm, policies, rates)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plot(report, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png", file=sys.stderr)
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _local_loadtest(args: argparse.Namespace, llm, policies: list[str], rates: list[float]) -> dict:
    from specgrove.serve.loadtest import run_loadtest

    if args.max_num_batched_tokens is None:
        budgets = [0, DEFAULT_MAX_NUM_BATCHED_TOKENS] if args.long_requests else [DEFAULT_MAX_NUM_BATCHED_TOKENS]
    else:
        budgets = _budgets(args.max_num_batched_tokens)
    return run_loadtest(
        llm,
        policies,
        rates,
        args.requests,
        args.max_tokens,
        args.profile,
        args.max_num_seqs,
        args.seed,
        args.data,
        log=_log,
        budgets=budgets,
        long_requests=args.long_requests,
        long_prompt_tokens=args.long_prompt_tokens,
    )


def cmd_profile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from specgrove.engine.latency import describe, profile
    from specgrove.models import defaults
    from specgrove.models.loader import load_model

    rows, tokens, contexts = _ints(args.rows, "rows"), _ints(args.tokens, "tokens"), _ints(args.contexts, "contexts")
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    graphs = False if args.enforce_eager else None
    target = load_model(
        args.target,
        dtype=args.dtype,
        device=args.device,
        quantization=None if args.quantization == "none" else args.quantization,
        cuda_graphs=graphs,
    )
    draft = None
    if not args.no_draft:
        if args.draft is None and args.target != defaults.DEFAULT_TARGET:
            raise ValueError("give --draft, or --no-draft to profile the target alone")
        draft = load_model(
            args.draft or defaults.DEFAULT_DRAFT,
            dtype=args.dtype,
            device=args.device,
            quantization=None if args.draft_quantization == "none" else args.draft_quantization,
            cuda_graphs=graphs,
        )
    console = Console(stderr=True)

    def show(sample: dict) -> None:
        console.print(
            f"  rows {sample['rows']:>2} x {sample['tokens_per_row']:>2} tokens, context "
            f"{sample['context_per_row']:>5}: {sample['seconds'] * 1000:8.1f} ms"
        )

    model = profile(
        target.model,
        draft.model if draft is not None else None,
        rows,
        tokens,
        contexts,
        args.repeats,
        show,
        fit=args.fit,
    )
    model.save(args.out)
    console.print(f"target: {describe(model.target)}")
    if model.draft is not None:
        console.print(f"draft:  {describe(model.draft)}")
    console.print(f"wrote {args.out}")
    return 0
