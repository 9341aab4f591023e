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
    max_num_batched_tokens: int | None = None,
):
    """The app and its engine thread. `max_num_batched_tokens`: prompt tokens prefilled per scheduler step
    (chunked prefill); None or 0: whole prompts."""
    from specgrove.engine.scheduler import Scheduler
    from specgrove.serve.app import build_app
    from specgrove.serve.async_engine import AsyncEngine

    scheduler = Scheduler(
        llm.engine,
        policy,
        max_num_seqs=max_num_seqs,
        max_waiting=max_waiting,
        max_num_batched_tokens=max_num_batched_tokens or None,
    )
    engine = AsyncEngine(scheduler)
    limits = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    return build_app(engine, model_name, api_key=api_key, **limits), engine
