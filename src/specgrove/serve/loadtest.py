"""`specgrove loadtest`: Poisson arrivals against the server over loopback, one server per policy and prefill
budget (or, with `--url`, against a server already running, such as `serve --replicas N`).

The models load once; for each policy (fixed:0 = no speculation, fixed:K, goodput) and each prefill budget
(`--max-num-batched-tokens`, 0 = whole prompts) a server starts on a free loopback port, and for each rate the
same seeded arrival times and Spec-Bench prompts are sent as streaming chat requests. Per (policy, budget, rate):
mean / p50 / p99 request latency (send to last byte), time to first token, inter-token latency (mean gap, and
the longest gap of each request: a stall) and output tokens/s over the run. JSON and a PNG plot of mean latency
against rate.

Mixed mode (`--long-requests N`): N requests with long prompts (`--long-prompt-tokens`, Spec-Bench questions
run together) arrive evenly spread among the short ones; the figures above are then the short requests', and
the long ones' are under "long". This is where chunked prefill shows: without it, each long prompt's whole
prefill runs between two decode steps of the short requests.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import threading
import time
from collections import Counter


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A uvicorn server for `app` on a free loopback port, in a thread, for the duration of a with-block."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import httpx

        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the load-test server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def _one(client, url: str, model: str, messages: list[dict], max_tokens: int, delay: float) -> dict:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    first = None
    arrivals = []  # perf_counter of every chunk with content
    usage = None
    status = None
    error_event = False
    async with client.stream(
        "POST",
        url + "/v1/chat/completions",
        json={
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("choices") and (data["choices"][0].get("delta") or {}).get("content"):
                arrivals.append(time.perf_counter())
                first = arrivals[0]
            if data.get("usage"):
                usage = data["usage"]
            if "error" in data:  # a stream that began, then failed (e.g. its replica died)
                status = data["error"].get("code", 500)
                error_event = True
    end = time.perf_counter()
    return {
        "status": status,
        "error_event": error_event,
        "start": start,
        "end": end,
        "latency_s": end - start,
        "ttft_s": (first - start) if first is not None else None,
        "completion_tokens": usage["completion_tokens"] if usage else 0,
        "prompt_tokens": usage["prompt_tokens"] if usage else 0,
        "accepted_tokens": usage["speculation"]["accepted_tokens"] if usage else 0,
        # after the first token: mean seconds per token, and the longest wait between two chunks (a stall)
        "itl_s": (arrivals[-1] - arrivals[0]) / (usage["completion_tokens"] - 1)
        if usage and usage["completion_tokens"] > 1 and len(arrivals) > 1
        else None,
        "max_gap_s": max(b - a for a, b in zip(arrivals, arrivals[1:])) if len(arrivals) > 1 else None,
    }


async def _run_rate(
    url: str, model: str, prompts: list[list[dict]], rate: float, max_tokens: int, seed: int
) -> list[dict]:
    import httpx

    rng = random.Random(seed)
    t, delays = 0.0, []
    for _ in prompts:
        delays.append(t)
        t += rng.expovariate(rate)
    async with httpx.AsyncClient(timeout=None) as client:
        return await asyncio.gather(*(_one(client, url, model, m, max_tokens, d) for m, d in zip(prompts, delays)))


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    itl = [r["itl_s"] for r in ok if r.get("itl_s") is not None]
    gaps = [r["max_gap_s"] for r in ok if r.get("max_gap_s") is not None]
    span = (max(r["end"] for r in ok) - min(r["start"] for r in ok)) if ok else 0.0
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        # the others by status, and how many of them were streams ended by an error event
        "failed": {
            str(status): n for status, n in sorted(Counter(r["status"] for r in results if r["status"] != 200).items())
        },
        "error_events": sum(1 for r in results if r.get("error_event")),
        "mean_latency_s": statistics.fmean(lat) if lat else float("nan"),
        "p50_latency_s": percentile(lat, 50),
        "p99_latency_s": percentile(lat, 99),
        "mean_ttft_s": statistics.fmean(ttft) if ttft else float("nan"),
        "p50_ttft_s": percentile(ttft, 50),
        "p99_ttft_s": percentile(ttft, 99),
        "mean_itl_s": statistics.fmean(itl) if itl else float("nan"),
        "p50_itl_s": percentile(itl, 50),
        "p99_itl_s": percentile(itl, 99),
        "p50_max_gap_s": percentile(gaps, 50),
        "p99_max_gap_s": percentile(gaps, 99),
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "completion_tokens": tokens,
    }


def long_prompt(questions: list[dict], tokenizer, num_tokens: int) -> str:
    """A user message of about `num_tokens` tokens: Spec-Bench questions run together, cut at that length."""
    if tokenizer is None:
        raise ValueError("--long-requests needs a target with a tokenizer")
    text, i = "Answer each of these questions in one line.\n\n", 0
    while len(tokenizer.encode(text, add_special_tokens=False)) < num_tokens:
        text += questions[i % len(questions)]["turns"][0] + "\n\n"
        i += 1
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:num_tokens])


def long_positions(total: int, count: int) -> set[int]:
    """Where `count` long requests go among `total` arrivals: spread evenly, none first."""
    return {min(total - 1, round((j + 0.5) * total / count)) for j in range(count)} if count else set()


def chat_prompts(data: str | None, count: int) -> list[list[dict]]:
    """`count` one-turn chat requests: the first Spec-Bench questions, repeated if there are fewer."""
    from specgrove.bench.questions import find_spec_bench, load_questions

    questions = load_questions(find_spec_bench(data), limit=count)
    return [[{"role": "user", "content": questions[i % len(questions)]["turns"][0]}] for i in range(count)]


def run_loadtest(
    llm,
    policies: list[str],
    rates: list[float],
    num_requests: int,
    max_tokens: int,
    profile_path: str | None,
    max_num_seqs: int,
    seed: int = 0,
    data: str | None = None,
    log=print,
    budgets: list[int] = (0,),
    long_requests: int = 0,
    long_prompt_tokens: int = 1024,
) -> dict:
    """`budgets`: the servers' --max-num-batched-tokens (0: whole prompts); `long_requests` more requests with
    prompts of about `long_prompt_tokens` tokens arrive among the `num_requests` short ones."""
    from specgrove.bench.questions import find_spec_bench, load_questions
    from specgrove.serve.server import build_server, make_policy

    short = chat_prompts(data, num_requests)
    total = num_requests + long_requests
    is_long = long_positions(total, long_requests)
    if long_requests:
        pool = load_questions(find_spec_bench(data), limit=None)
        long = [{"role": "user", "content": long_prompt(pool, llm.target.tokenizer, long_prompt_tokens)}]
    prompts, shorts = [], iter(short)
    for i in range(total):
        prompts.append(long if i in is_long else next(shorts))
    model = llm.target.name
    report = {
        "config": {
            "policies": policies,
            "rates": rates,
            "requests": num_requests,
            "max_tokens": max_tokens,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": list(budgets),
            "long_requests": long_requests,
            "long_prompt_tokens": long_prompt_tokens if long_requests else None,
            "seed": seed,
            "target": llm.target.name,
            "draft": llm.draft.name if llm.draft is not None else None,
            "k_max": llm.engine.num_speculative_tokens,
        },
        "results": [],
    }
    for policy_text in policies:
        for budget in budgets:
            policy = make_policy(policy_text, llm, profile_path)
            app, _ = build_server(
                llm,
                policy,
                max_num_seqs,
                max_waiting=total,
                model_name=model,
                max_num_batched_tokens=budget,
            )
            with ServerThread(app) as server:
                for rate in rates:
                    results = asyncio.run(_run_rate(server.url, model, prompts, rate, max_tokens, seed))
                    row = {
                        "policy": policy_text,
                        "max_num_batched_tokens": budget,
                        "rate": rate,
                        **summarize([r for i, r in enumerate(results) if i not in is_long]),
                    }
                    if long_requests:
                        longs = [r for i, r in enumerate(results) if i in is_long]
                        row["long"] = summarize(longs)
                        row["long"]["prompt_tokens"] = max(r["prompt_tokens"] for r in longs)
                    if hasattr(policy, "chosen") and policy.chosen:
                        row["mean_k"] = statistics.fmean(policy.chosen)
                        policy.chosen.clear()
                    report["results"].append(row)
                    log(
                        f"{policy_text:>10} chunk {budget or 'off':>4} rate {rate:g}/s"
                        + (" (short requests)" if long_requests else "")
                        + f": mean {row['mean_latency_s']:.2f} s, p50 {row['p50_latency_s']:.2f}, "
                        f"p99 {row['p99_latency_s']:.2f}, "
                        f"ttft p50 {row['p50_ttft_s']:.2f} p99 {row['p99_ttft_s']:.2f}, "
                        f"itl {row['mean_itl_s'] * 1e3:.0f} ms, longest gap p99 {row['p99_max_gap_s']:.2f} s, "
                        f"{row['tokens_per_s']:.2f} tok/s"
                        + (f", mean k {row['mean_k']:.2f}" if "mean_k" in row else "")
                    )
    return report


def run_remote_loadtest(
    url: str,
    model: str | None,
    rates: list[float],
    num_requests: int,
    max_tokens: int,
    seed: int = 0,
    data: str | None = None,
    log=print,
) -> dict:
    """The same arrivals and prompts against a server already running at `url` (e.g. `serve --replicas N`):
    its own policy, one row per rate under policy "server". `model` None: the server's first."""
    import httpx

    try:
        served = [m["id"] for m in httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError) as error:
        raise ValueError(f"no OpenAI-compatible server answers at {url}: {error}") from None
    model = served[0] if model is None and served else model
    if model not in served:
        raise ValueError(f"{url} serves {served}, not {model!r}; give --model")
    prompts = chat_prompts(data, num_requests)
    report = {
        "config": {
            "url": url,
            "policies": ["server"],
            "rates": rates,
            "requests": num_requests,
            "max_tokens": max_tokens,
            "seed": seed,
            "target": model,
        },
        "results": [],
    }
    for rate in rates:
        results = asyncio.run(_run_rate(url.rstrip("/"), model, prompts, rate, max_tokens, seed))
        row = {"policy": "server", "rate": rate, **summarize(results)}
        report["results"].append(row)
        log(
            f"rate {rate:g}/s: {row['ok']}/{row['requests']} ok, mean {row['mean_latency_s']:.2f} s, "
            f"p50 {row['p50_latency_s']:.2f}, p99 {row['p99_latency_s']:.2f}, ttft {row['mean_ttft_s']:.2f} s, "
            f"{row['tokens_per_s']:.2f} tok/s"
            + (
                f"; failed {row['failed']} ({row['error_events']} streams ended by an error event)"
                if row["failed"]
                else ""
            )
        )
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = report["config"].get("max_num_batched_tokens", [0])
    for policy in report["config"]["policies"]:
        for budget in budgets:
            rows = [
                r for r in report["results"] if r["policy"] == policy and r.get("max_num_batched_tokens", 0) == budget
            ]
            label = policy if len(budgets) == 1 else f"{policy}, chunk {budget or 'off'}"
            ax.plot([r["rate"] for r in rows], [r["mean_latency_s"] for r in rows], marker="o", label=label)
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("mean request latency (s)" + (", short requests" if report["config"].get("long_requests") else ""))
    ax.set_title(f"{report['config']['target']}: latency vs load")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
