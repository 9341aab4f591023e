"""`specgrove loadtest`: Poisson arrivals against the server over loopback, one server per policy (or, with
`--url`, against a server already running, such as `serve --replicas N`).

The models load once; for each policy (fixed:0 = no speculation, fixed:K, goodput) a server with that
policy starts on a free loopback port, and for each rate the same seeded arrival times and Spec-Bench
prompts are sent as streaming chat requests. Per (policy, rate): mean / p50 / p99 request latency
(send to last byte), time to first token, and output tokens/s over the run. JSON and a PNG plot of mean
latency against rate.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import threading
import time


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
    usage = None
    status = None
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
            if first is None and data.get("choices") and (data["choices"][0].get("delta") or {}).get("content"):
                first = time.perf_counter()
            if data.get("usage"):
                usage = data["usage"]
            if "error" in data:
                status = data["error"].get("code", 500)
    end = time.perf_counter()
    return {
        "status": status,
        "start": start,
        "end": end,
        "latency_s": end - start,
        "ttft_s": (first - start) if first is not None else None,
        "completion_tokens": usage["completion_tokens"] if usage else 0,
        "accepted_tokens": usage["speculation"]["accepted_tokens"] if usage else 0,
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
    span = (max(r["end"] for r in ok) - min(r["start"] for r in ok)) if ok else 0.0
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "mean_latency_s": statistics.fmean(lat) if lat else float("nan"),
        "p50_latency_s": percentile(lat, 50),
        "p99_latency_s": percentile(lat, 99),
        "mean_ttft_s": statistics.fmean(ttft) if ttft else float("nan"),
        "p50_ttft_s": percentile(ttft, 50),
        "p99_ttft_s": percentile(ttft, 99),
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "completion_tokens": tokens,
    }


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
) -> dict:
    from specgrove.bench.questions import find_spec_bench, load_questions
    from specgrove.serve.server import build_server, make_policy

    questions = load_questions(find_spec_bench(data), limit=num_requests)
    if len(questions) < num_requests:
        questions = [questions[i % len(questions)] for i in range(num_requests)]
    prompts = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    model = llm.target.name
    report = {
        "config": {
            "policies": policies,
            "rates": rates,
            "requests": num_requests,
            "max_tokens": max_tokens,
            "max_num_seqs": max_num_seqs,
            "seed": seed,
            "target": llm.target.name,
            "draft": llm.draft.name if llm.draft is not None else None,
            "k_max": llm.engine.num_speculative_tokens,
        },
        "results": [],
    }
    for policy_text in policies:
        policy = make_policy(policy_text, llm, profile_path)
        app, engine = build_server(llm, policy, max_num_seqs, max_waiting=num_requests, model_name=model)
        with ServerThread(app) as server:
            for rate in rates:
                results = asyncio.run(_run_rate(server.url, model, prompts, rate, max_tokens, seed))
                row = {"policy": policy_text, "rate": rate, **summarize(results)}
                if hasattr(policy, "chosen") and policy.chosen:
                    row["mean_k"] = statistics.fmean(policy.chosen)
                    policy.chosen.clear()
                report["results"].append(row)
                log(
                    f"{policy_text:>10} rate {rate:g}/s: mean {row['mean_latency_s']:.2f} s, "
                    f"p50 {row['p50_latency_s']:.2f}, "
                    f"p99 {row['p99_latency_s']:.2f}, ttft {row['mean_ttft_s']:.2f} s, {row['tokens_per_s']:.2f} tok/s"
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

    from specgrove.bench.questions import find_spec_bench, load_questions

    try:
        served = [m["id"] for m in httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError) as error:
        raise ValueError(f"no OpenAI-compatible server answers at {url}: {error}") from None
    model = served[0] if model is None and served else model
    if model not in served:
        raise ValueError(f"{url} serves {served}, not {model!r}; give --model")
    questions = load_questions(find_spec_bench(data), limit=num_requests)
    questions = [questions[i % len(questions)] for i in range(num_requests)]
    prompts = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
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
        )
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in report["config"]["policies"]:
        rows = [r for r in report["results"] if r["policy"] == policy]
        ax.plot([r["rate"] for r in rows], [r["mean_latency_s"] for r in rows], marker="o", label=policy)
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("mean request latency (s)")
    ax.set_title(f"{report['config']['target']}: latency vs load")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
