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
):
    from specgrove.engine.scheduler import Scheduler
    from specgrove.serve.app import build_app
    from specgrove.serve.async_engine import AsyncEngine

    scheduler = Scheduler(llm.engine, policy, max_num_seqs=max_num_seqs, max_waiting=max_waiting)
    engine = AsyncEngine(scheduler)
    limits = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    return build_app(engine, model_name, api_key=api_key, allowed_hosts=allowed_hosts, **limits), engine


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
