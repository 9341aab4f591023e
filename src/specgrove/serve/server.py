"""A server from an LLM: the speculation policy (`--policy goodput | fixed:K`) and the app with its engine
thread (`build_server`), shared by `specgrove serve` and the load test."""

from __future__ import annotations

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
