"""A server from an LLM: the speculation policy (`--policy goodput | fixed:K`) and the app with its engine
thread (`build_server`), shared by `specgrove serve` and the load test."""

from __future__ import annotations

import argparse
import sys


def policy_k(text: str) -> int | None:
    """The K of "fixed:K", None for "goodput"; anything else is an error (checked before models load)."""
    if text == "goodput":
        return None
    if text.startswith("fixed:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--policy fixed:K takes an integer K >= 0, got {text!r}") from None
        if k < 0:
            raise ValueError(f"--policy fixed:K takes an integer K >= 0, got {text!r}")
        return k
    raise ValueError(f"--policy is goodput or fixed:K, got {text!r}")


def make_policy(text: str, llm, profile_path: str | None):
    from specgrove.engine.latency import LatencyModel, profile
    from specgrove.engine.policy import FixedPolicy, GoodputPolicy

    k = policy_k(text)
    if k is not None:
        if k > llm.engine.num_speculative_tokens:
            raise ValueError(f"--policy {text}: K is above -k {llm.engine.num_speculative_tokens}; raise -k")
        return FixedPolicy(k)
    if profile_path is not None:
        latency = LatencyModel.load(profile_path)
    else:
        print("[specgrove] no --profile: measuring this machine (about a minute)", file=sys.stderr)
        latency = profile(
            llm.target.model,
            llm.draft.model if llm.draft is not None else None,
            rows=(1, 2, 4),
            tokens_per_row=(1, 4),
            contexts=(128,),
            repeats=2,
        )
    return GoodputPolicy(latency, llm.engine.num_speculative_tokens)


def build_server(
    llm,
    policy,
    max_num_seqs: int,
    max_waiting: int,
    model_name: str,
    api_key=None,
    max_body_bytes=None,
    allowed_hosts=None,
    max_num_batched_tokens: int | None = None,
):
    """The app serving one LLM under `model_name`, and its AsyncEngine. `max_num_batched_tokens`: prompt
    tokens prefilled per scheduler step (chunked prefill); None or 0: whole prompts."""
    app, engines = build_targets_server(
        {model_name: (llm, policy)},
        max_num_seqs,
        max_waiting,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        allowed_hosts=allowed_hosts,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    return app, engines[model_name]


def build_targets_server(
    targets: dict,
    max_num_seqs: int,
    max_waiting: int,
    api_key=None,
    max_body_bytes=None,
    allowed_hosts=None,
    max_num_batched_tokens: int | None = None,
):
    """The app serving several targets ({model name: (llm, policy)}, the first the default) and their
    AsyncEngines by name. Each target has its own engine thread, cache rows (`max_num_seqs` each), queue,
    policy and acceptance statistics; the LLMs may share one loaded draft (`LLM(draft=other.draft)`). The
    metrics of all share one registry, labelled by model_name."""
    from specgrove.engine.scheduler import Scheduler
    from specgrove.serve.app import build_app
    from specgrove.serve.async_engine import AsyncEngine
    from specgrove.serve.metrics import MetricFamilies, ServerMetrics

    families = MetricFamilies()
    engines = {}
    for name, (llm, policy) in targets.items():
        scheduler = Scheduler(
            llm.engine,
            policy,
            max_num_seqs=max_num_seqs,
            max_waiting=max_waiting,
            max_num_batched_tokens=max_num_batched_tokens or None,
        )
        engines[name] = AsyncEngine(scheduler, ServerMetrics(name, families))
    limits = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    return build_app(engines, api_key=api_key, allowed_hosts=allowed_hosts, **limits), engines


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
    from specgrove.cli_options import build_llm

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


def allowed_hosts_for(bind_host: str, flag: str | None) -> list[str] | None:
    """The Host names a server bound to `bind_host` answers to: those of --allowed-hosts (comma-separated; "*"
    is any), else the loopback names when bound to a loopback address (against DNS rebinding), else any (None:
    a server bound to another address is reached under names it cannot know)."""
    import ipaddress

    from specgrove.serve.app import LOOPBACK_HOSTS

    if flag is not None:
        hosts = [h.strip() for h in flag.split(",") if h.strip()]
        if not hosts:
            raise ValueError(f"--allowed-hosts takes comma-separated host names (or '*'), got {flag!r}")
        return None if "*" in hosts else hosts
    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return sorted({*LOOPBACK_HOSTS, bind_host.strip("[]")}) if loopback else None
