"""The OpenAI-compatible server (specgrove serve) on tiny models, over real HTTP on loopback.

The official `openai` client against it; a battery of bad requests (each a clear 400); an overload burst
(every response correct and unmixed, or 429; none lost; the server healthy afterwards, its Prometheus
counters equal to the sum of the responses' usage); a client that disconnects frees its slot; a request
that fails inside generation fails alone.
"""

import asyncio
import concurrent.futures
import json
import time

import httpx
import pytest
import torch

from specgrove.drafting.draft_model import DraftModelProposer
from specgrove.engine.engine import SpecEngine
from specgrove.engine.latency import LatencyModel, LinearTime
from specgrove.engine.policy import FixedPolicy, GoodputPolicy
from specgrove.engine.scheduler import Scheduler
from specgrove.sampling import SamplingParams
from specgrove.serve.async_engine import AsyncEngine
from specgrove.serve.loadtest import ServerThread
from specgrove.serve.server import build_server

from conftest import tiny_llm

MODEL = "tiny"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}h{% endif %}"


class _LLM:  # what build_server needs of api.LLM
    def __init__(self, engine):
        self.engine = engine


class Server(ServerThread):
    """A server on tiny models (draft model, fixed k) on a free loopback port."""

    def __init__(self, target, draft, max_num_seqs=2, max_waiting=3, k=3, max_model_len=48, **limits):
        target.tokenizer.chat_template = CHAT_TEMPLATE
        self.proposer = DraftModelProposer(draft, max_model_len)
        self.engine = SpecEngine(target, self.proposer, k, max_model_len=max_model_len)
        app, self.async_engine = build_server(
            _LLM(self.engine), FixedPolicy(k), max_num_seqs, max_waiting, MODEL, **limits
        )
        super().__init__(app)

    def metric(self, name: str, labels: str = "") -> float:
        return metric_value(httpx.get(self.url + "/metrics").text, name, labels)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The sum of `name` over the series holding every label of `labels` ('{a="x",b="y"}' or '')."""
    wanted = [pair for pair in labels.strip("{}").split(",") if pair]
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric_name, _, series_labels = series.partition("{")
        if metric_name == name and all(pair in series_labels.rstrip("}").split(",") for pair in wanted):
            total += float(value)
    return total


@pytest.fixture()
def server(tiny_target, tiny_draft):
    with Server(tiny_target, tiny_draft) as s:
        yield s


def expected_text(target, prompt: str, max_tokens: int) -> str:
    engine = SpecEngine(target, None, 0, max_model_len=48)
    ids = target.tokenizer.encode(prompt, add_special_tokens=False)
    seq = engine.generate(engine.new_sequence(ids, SamplingParams(temperature=0, max_tokens=max_tokens)))
    return seq.text


def test_openai_client(server, tiny_target):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]

    out = client.completions.create(model=MODEL, prompt="abcab", max_tokens=9, temperature=0)
    assert out.choices[0].text == expected_text(tiny_target, "abcab", 9)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 9 and out.usage.prompt_tokens == 5
    spec = out.usage.model_extra["speculation"]
    assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="abcab",
            max_tokens=9,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == 9 and not chunks[-1].choices

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "abcab"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.content == expected_text(tiny_target, "abcabh", 6)
    streamed = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "abcab"}], max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == "length"

    # sampling with a seed is reproducible; stop strings end the text before them
    a = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    b = client.completions.create(model=MODEL, prompt="abc", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text
    full = expected_text(tiny_target, "abcab", 12)
    stop = full[3:5]
    cut = client.completions.create(model=MODEL, prompt="abcab", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", {"prompt": "abc", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "abc", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "abc", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "abc", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "abc", "temperature": -1.0}, "temperature"),
    ("/v1/completions", {"prompt": "abc", "top_k": -5}, "top_k"),
    ("/v1/completions", {"prompt": "abc", "n": 0}, "n must be"),
    ("/v1/completions", {"prompt": "abc", "n": 17}, "n must be"),
    ("/v1/completions", {"prompt": "abc", "n": 6}, "n=6"),
    ("/v1/completions", {"prompt": "abc", "model": "gpt-9"}, "not served"),
    ("/v1/completions", {"prompt": "abc", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "abc", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "abc", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "abc", "frequency_penalty": -3.0}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "abc", "repetition_penalty": 0.0}, "repetition_penalty"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "repetition_penalty": -1.0},
        "repetition",
    ),
    ("/v1/completions", {"max_tokens": 5}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "empty"),
    ("/v1/completions", {"prompt": [1, 99]}, "token ids"),
    ("/v1/completions", {"prompt": "abc" * 20, "max_tokens": 5}, "max_model_len"),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 100}, "max_model_len"),
    ("/v1/completions", [1, 2], "body"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "a"}]}, "role"),
    ("/v1/chat/completions", {"messages": "abc"}, "messages"),
    # max_completion_tokens wins over max_tokens, but an invalid max_tokens is still refused (as the schema says)
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 3, "max_tokens": 0},
        "max_tokens",
    ),
    # fields that would change what the answer means are refused, not silently ignored
    ("/v1/completions", {"prompt": "abc", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "abc", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "abc", "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 3}, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    ("/v1/completions", {"prompt": "abc", "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "abc", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "abc", "best_of": 3}, "best_of"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
        "tools",
    ),
    # the distribution of temperature 1e-300 is NaN: refused before it reaches a batch
    ("/v1/completions", {"prompt": "abc", "temperature": 1e-300}, "too small"),
    ("/v1/completions", {"prompt": "abc", "seed": 2**64}, "seed"),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', "lone surrogate"),
    ("/v1/completions", b'{"prompt": "abc", "stop": ["x\\udc00"]}', "lone surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "lone surrogate"),
]


def test_bad_requests_get_clear_400s(server):
    for path, body, needle in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        else:
            r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert needle.lower() in error["message"].lower(), (body, error)
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.engine.pool.in_use == 0


def test_overload_burst(server, tiny_target, monkeypatch):
    original = SpecEngine.step_batch

    def slow_step(self, seqs, ks=None):  # steps of a real model's length, so that the burst overloads it
        time.sleep(0.1)
        return original(self, seqs, ks)

    monkeypatch.setattr(SpecEngine, "step_batch", slow_step)
    prompts = ["abc", "bca", "cab", "abcd", "dcba", "aab", "bba", "cca", "ddb", "bad", "dab", "cad"]
    expected = {p: expected_text(tiny_target, p, 10) for p in prompts}

    def send(prompt):
        return prompt, httpx.post(
            server.url + "/v1/completions",
            timeout=120,
            json={"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0},
        )

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(send, prompts))
    codes = [r.status_code for _, r in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 1, codes
    usage_accepted = usage_draft = 0
    for prompt, r in results:
        if r.status_code == 200:
            body = r.json()
            assert body["choices"][0]["text"] == expected[prompt], "responses must not mix up clients"
            usage_accepted += body["usage"]["speculation"]["accepted_tokens"]
            usage_draft += body["usage"]["speculation"]["draft_tokens"]
        else:
            assert "retry" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.metric("specgrove_accepted_tokens_total") == usage_accepted
    assert server.metric("specgrove_draft_tokens_total") == usage_draft
    assert server.metric("specgrove_requests_rejected_total") == codes.count(429)
    assert server.metric("specgrove_requests_finished_total", '{finish_reason="length"}') == codes.count(200)
    assert server.metric("specgrove_request_latency_seconds_count") == codes.count(200)
    assert server.metric("specgrove_requests_running") == 0 and server.engine.pool.in_use == 0
    # still serving
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 10, "temperature": 0})
    assert r.json()["choices"][0]["text"] == expected["abc"]


def test_disconnect_frees_the_slot(tiny_target, tiny_draft):
    with Server(tiny_target, tiny_draft, max_model_len=4096) as server:
        body = {"prompt": "abc", "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # first chunk, then hang up
        deadline = time.time() + 30
        while time.time() < deadline and server.engine.pool.in_use:
            time.sleep(0.1)
        assert server.engine.pool.in_use == 0
        assert server.metric("specgrove_requests_finished_total", '{finish_reason="abort"}') == 1
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_failing_request_fails_alone(server, tiny_target, monkeypatch):
    original = DraftModelProposer.propose_batch

    def fails_on_dd(self, seqs, ks):
        if any(s.prompt_ids[:2] == [3, 3] for s in seqs):  # "dd"
            raise RuntimeError("draft exploded")
        return original(self, seqs, ks)

    monkeypatch.setattr(DraftModelProposer, "propose_batch", fails_on_dd)

    def send(prompt):
        return httpx.post(
            server.url + "/v1/completions", timeout=120, json={"prompt": prompt, "max_tokens": 8, "temperature": 0}
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad, good = list(pool.map(send, ["ddab", "abc"]))
    assert bad.status_code == 500 and "draft exploded" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected_text(tiny_target, "abc", 8)
    assert httpx.get(server.url + "/health").status_code == 200
    # streaming: the error arrives as an SSE error event
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={"prompt": "ddab", "max_tokens": 8, "stream": True}
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "draft exploded" in events[-1]["error"]["message"]


def test_no_record_outlives_its_request(tiny_target, tiny_draft):
    """The server's per-request records (the metrics' counted steps, the policy's acceptance estimates, the
    scheduler's times) are gone once requests finish or are aborted."""
    engine = SpecEngine(tiny_target, DraftModelProposer(tiny_draft, 4096), 3, max_model_len=4096)
    policy = GoodputPolicy(LatencyModel(LinearTime(0.01, 0.001, 0.0), LinearTime(0.002, 0.0005, 0.0)), max_k=3)
    async_engine = AsyncEngine(Scheduler(engine, policy, max_num_seqs=2))

    async def requests():
        short = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        streams = [async_engine.submit([1, 2, 3], short, f"r{i}") for i in range(3)]
        endless = async_engine.submit([2, 1], SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True), "long")
        for stream in streams:
            while not (await stream.queue.get()).finished:
                pass
        await endless.queue.get()  # running now
        assert async_engine.metrics.counted_steps and policy.request_stats
        async_engine.abort("long")
        while "long" in async_engine.streams:
            await asyncio.sleep(0.01)

    async_engine.start()
    try:
        asyncio.run(asyncio.wait_for(requests(), 120))
    finally:
        async_engine.stop()
    assert async_engine.error is None and not async_engine.scheduler.has_unfinished
    assert async_engine.metrics.counted_steps == {}
    assert policy.request_stats == {} and async_engine.scheduler.times == {}
    assert engine.pool.in_use == 0


def _loadtest_inputs(tiny_dirs, tmp_path):
    """The model options (a tiny target with a chat template, its draft) and a questions file of three."""
    import shutil

    target = tmp_path / "target"
    shutil.copytree(tiny_dirs["target"], target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": i, "category": "c", "turns": [t]}) + "\n"
            for i, t in enumerate(["abc", "bcad", "cab"])
        )
    )
    return ["--target", target, "--draft", tiny_dirs["draft"], "--dtype", "float32"], questions


def test_loadtest_and_profile_commands(tiny_dirs, tmp_path, capsys):
    """`specgrove profile` writes a loadable latency model; `specgrove loadtest` runs every policy at every
    rate against a real server and writes its JSON and plot (tiny models with a chat template)."""
    from specgrove.cli import main
    from specgrove.engine.latency import LatencyModel

    common, questions = _loadtest_inputs(tiny_dirs, tmp_path)
    profile = tmp_path / "profile.json"
    assert (
        main(
            [
                str(a)
                for a in [
                    "profile",
                    *common,
                    "--rows",
                    "1,2",
                    "--tokens",
                    "1,2",
                    "--contexts",
                    "8",
                    "--repeats",
                    "1",
                    "--out",
                    profile,
                ]
            ]
        )
        == 0
    )
    LatencyModel.load(profile)
    out = tmp_path / "lt"
    assert (
        main(
            [
                str(a)
                for a in [
                    "loadtest",
                    *common,
                    "--policies",
                    "fixed:0,fixed:2,goodput",
                    "--profile",
                    profile,
                    "--rates",
                    "20,50",
                    "--requests",
                    "3",
                    "--max-tokens",
                    "5",
                    "--max-model-len",
                    "64",
                    "--data",
                    questions,
                    "--out",
                    out,
                ]
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "lt.json").read_text())
    assert [(r["policy"], r["rate"]) for r in report["results"]] == [
        (p, r) for p in ("fixed:0", "fixed:2", "goodput") for r in (20.0, 50.0)
    ]
    for row in report["results"]:
        assert row["ok"] == 3 and row["completion_tokens"] == 15
        assert 0 < row["p50_latency_s"] <= row["p99_latency_s"] and row["tokens_per_s"] > 0
    assert (tmp_path / "lt.png").stat().st_size > 1000
    assert "goodput" in capsys.readouterr().err
    bad = [
        "loadtest",
        *common,
        "--policies",
        "fixed:1,sometimes",
        "--rates",
        "1",
        "--requests",
        "1",
        "--data",
        questions,
        "--out",
        tmp_path / "never",
    ]
    assert main([str(a) for a in bad]) != 0
    assert "--policy is goodput or fixed:K, got 'sometimes'" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()


def test_loadtest_mixed_mode_reports_short_requests_per_prefill_budget(tiny_dirs, tmp_path):
    """--long-requests: the long prompts arrive among the short requests; each budget gets its server and its
    row, the short requests' figures apart from the long ones'."""
    from specgrove.cli import main

    common, questions = _loadtest_inputs(tiny_dirs, tmp_path)
    args = ["loadtest", *common, "--policies", "fixed:2", "--rates", "50", "--requests", "3", "--max-tokens", "5"]
    args += ["--long-requests", "1", "--long-prompt-tokens", "30", "--max-num-batched-tokens", "0,4"]
    args += ["--max-model-len", "64", "--data", questions, "--out", tmp_path / "mixed"]
    assert main([str(a) for a in args]) == 0
    report = json.loads((tmp_path / "mixed.json").read_text())
    assert report["config"]["max_num_batched_tokens"] == [0, 4] and report["config"]["long_requests"] == 1
    assert [r["max_num_batched_tokens"] for r in report["results"]] == [0, 4]
    for row in report["results"]:
        assert row["ok"] == 3 and row["completion_tokens"] == 15
        assert row["long"]["ok"] == 1 and row["long"]["prompt_tokens"] >= 30
        assert 0 < row["p50_itl_s"] <= row["p99_itl_s"] and row["p99_max_gap_s"] > 0
    bad = ["loadtest", *common, "--max-num-batched-tokens", "4,-1", "--data", questions, "--out", tmp_path / "x"]
    assert main([str(a) for a in bad]) != 0


def _streamed_text(server, body):
    text = ""
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
    return text


def test_the_stream_always_adds_up_to_the_non_streamed_text(server, tiny_target):
    """Over many stop strings (short, long, longer than the text, at its start, middle and end, absent), the
    concatenated stream equals the non-streamed text."""
    full = expected_text(tiny_target, "abcab", 14)
    stops = {full[i : i + n] for n in (1, 2, 4, 7) for i in range(0, len(full) - n + 1, 3)}
    stops |= {full, full + "x", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", full[-3:] + "zzzzzzzzzzzzzzzzzzzz"}
    stops.discard("")
    for stop in sorted(stops):
        body = {"prompt": "abcab", "max_tokens": 14, "temperature": 0, "stop": [stop]}
        whole = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert whole == (full[: full.index(stop)] if stop in full else full)
        assert _streamed_text(server, body) == whole, stop


def test_settled_text_never_sends_what_a_stop_string_will_cut(tiny_target):
    """The engine may have run past a stream's delta (and past a stop string) when the delta is read: what is
    sent stays a prefix of the final text, also when the text is shorter than the stop string."""
    from specgrove.engine.sequence import Sequence as Seq
    from specgrove.serve.app import settled_text

    tok = tiny_target.tokenizer
    ids = tok.encode("abcdabcdab", add_special_tokens=False)
    for stop in ["cda", "dabcdabcdabcdabcdab", "b", "abcdabcdab"]:
        seq = Seq("r", [1], SamplingParams(temperature=0, max_tokens=20, stop=[stop]), None, output_ids=list(ids))
        text = tok.decode(ids, skip_special_tokens=True)
        final = text[: text.find(stop)] if stop in text else text
        hold = len(stop) - 1
        for n in range(len(ids) + 1):
            seq.output_ids = list(ids[:n])
            sent = settled_text(tok, seq, hold, finished=False)
            assert final.startswith(sent), (stop, n, sent)


def test_max_waiting_zero_serves_an_idle_server(tiny_target, tiny_draft):
    """--max-waiting 0: no request may wait, but one that a free row admits at once is served."""
    with Server(tiny_target, tiny_draft, max_num_seqs=2, max_waiting=0) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(tiny_target, "abc", 4)


def test_the_running_gauge_returns_to_zero_after_disconnects(server):
    body = {"prompt": "abc", "max_tokens": 40, "temperature": 0, "stream": True}
    for _ in range(4):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # first chunk, then hang up
    deadline = time.time() + 30
    while time.time() < deadline and (server.engine.pool.in_use or server.metric("specgrove_requests_running")):
        time.sleep(0.1)
    assert server.engine.pool.in_use == 0
    assert server.metric("specgrove_requests_running") == 0 and server.metric("specgrove_requests_waiting") == 0


def test_the_engine_loop_recovers_from_a_crash(server, tiny_target, monkeypatch):
    """A crash of the loop itself (not of one request) ends the open requests with an error, frees their rows,
    and the server serves the next request without anyone restarting it."""
    original = Scheduler.step
    crashed = []

    def crash_once(self):
        if not crashed and self.running:
            crashed.append(1)
            raise RuntimeError("loop exploded")
        return original(self)

    monkeypatch.setattr(Scheduler, "step", crash_once)
    body = {"prompt": "abc", "max_tokens": 6, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "loop exploded" in events[-1]["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(tiny_target, "abc", 6)
    assert httpx.get(server.url + "/health").status_code == 200
    assert server.metric("specgrove_engine_restarts_total") == 1
    assert server.engine.pool.in_use == 0


def test_error_shapes_defaults_and_retry_after(tiny_target, tiny_draft, monkeypatch):
    """404/405 answer in OpenAI's error shape; completions' max_tokens null means 16; a 429 says when to
    retry."""
    import threading

    original = SpecEngine.step_batch
    hold = threading.Event()

    def held_step(self, seqs, ks=None):  # the long request stays running until the test lets it go
        if any(s.request_id.startswith("cmpl-") and s.params.max_tokens == 40 for s in seqs):
            hold.wait(60)
        return original(self, seqs, ks)

    monkeypatch.setattr(SpecEngine, "step_batch", held_step)
    with Server(tiny_target, tiny_draft, max_num_seqs=1, max_waiting=0, max_model_len=64) as server:
        for method, path in (("GET", "/v1/nowhere"), ("GET", "/v1/completions"), ("DELETE", "/v1/models")):
            r = httpx.request(method, server.url + path)
            assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["code"] == r.status_code
        r = httpx.post(
            server.url + "/v1/completions",
            json={"prompt": "abc", "max_tokens": None, "temperature": 0, "ignore_eos": True},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
        # one request holds the only row, none may wait: the next gets 429 with Retry-After
        body = {"prompt": "abc", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=120)
            deadline = time.time() + 60
            while not server.async_engine.scheduler.running and time.time() < deadline:
                time.sleep(0.01)
            busy = httpx.post(server.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 2})
            hold.set()
            assert long.result().status_code == 200
        assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1


def test_penalties_are_honoured(server, tiny_target):
    """The penalties reach the engine: greedy output is plain greedy decoding with the same penalties."""
    penalties = {"presence_penalty": 1.0, "frequency_penalty": 0.5, "repetition_penalty": 1.3}
    engine = SpecEngine(tiny_target, None, 0, max_model_len=48)
    for prompt in ("abcab", "aaaa"):
        ids = tiny_target.tokenizer.encode(prompt, add_special_tokens=False)
        params = SamplingParams(temperature=0, max_tokens=12, **penalties)
        expected = engine.generate(engine.new_sequence(ids, params)).text
        r = httpx.post(
            server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, **penalties}
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    chat = {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 5, "temperature": 0.8, "seed": 1}
    r = httpx.post(server.url + "/v1/chat/completions", json={**chat, **penalties})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_neutral_values_of_unhonoured_fields_are_fine_and_developer_is_system(server, tiny_target):
    body = {
        "prompt": "abc",
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": None,
        "logit_bias": {},
        "suffix": "",
        "best_of": 1,
    }
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(tiny_target, "abc", 4)
    chat = {"max_tokens": 4, "temperature": 0, "logprobs": False, "response_format": {"type": "text"}, "tools": []}
    as_developer = httpx.post(
        server.url + "/v1/chat/completions", json={**chat, "messages": [{"role": "developer", "content": "ab"}]}
    )
    as_system = httpx.post(
        server.url + "/v1/chat/completions", json={**chat, "messages": [{"role": "system", "content": "ab"}]}
    )
    assert as_developer.status_code == 200 and as_developer.json()["usage"] == as_system.json()["usage"]
    assert as_developer.json()["choices"][0]["message"] == as_system.json()["choices"][0]["message"]


def test_api_key_body_limit_and_no_internals_in_errors(tiny_target, tiny_draft, monkeypatch):
    with Server(tiny_target, tiny_draft, api_key="s3cret", max_body_bytes=2000) as server:
        body = {"prompt": "abc", "max_tokens": 3, "temperature": 0}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", headers
        assert httpx.get(server.url + "/v1/models").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        r = httpx.post(server.url + "/v1/completions", json=body, headers=ok)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(tiny_target, "abc", 3)
        assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
        assert httpx.get(server.url + "/metrics").status_code == 200
        # a body over the limit: 413 whether its length is declared or it arrives in chunks
        big = {"prompt": "a" * 5000, "max_tokens": 3}
        r = httpx.post(server.url + "/v1/completions", json=big, headers=ok)
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]

        def chunks():
            data = json.dumps(big).encode()
            for i in range(0, len(data), 500):
                yield data[i : i + 500]

        r = httpx.post(
            server.url + "/v1/completions", content=chunks(), headers={**ok, "content-type": "application/json"}
        )
        assert r.status_code == 413
        # an unexpected failure: 500 in OpenAI's shape, no trace, no path
        import specgrove.serve.app as app_module

        def broken(*args, **kwargs):
            raise KeyError("/secret/path/to/file.py")

        monkeypatch.setattr(app_module, "completion_body", broken)
        r = httpx.post(server.url + "/v1/completions", json=body, headers=ok)
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal server error (KeyError)"
        assert "Traceback" not in r.text and "/secret" not in r.text and ".py" not in r.text
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_long_prompt_does_not_freeze_the_event_loop(server, tiny_target, monkeypatch):
    """Tokenization runs off the event loop: while one request's tokenization is held up, /health answers (the
    tokenization waits for /health's answer, so on the event loop this would wait out the 60 s and fail)."""
    import threading

    tokenizer = tiny_target.tokenizer
    original = type(tokenizer).encode
    started, released = threading.Event(), threading.Event()
    gave_up = []

    def held_encode(self, text, *args, **kwargs):
        if text.startswith("slow"):
            started.set()
            if not released.wait(60):
                gave_up.append(1)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "encode", held_encode)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            httpx.post, server.url + "/v1/completions", json={"prompt": "slowabc", "max_tokens": 2}, timeout=120
        )
        assert started.wait(30)
        health = httpx.get(server.url + "/health", timeout=120)
        released.set()
        assert health.status_code == 200 and not gave_up, "/health waited for a tokenization"
        assert future.result().status_code == 200


def test_the_openapi_schema_documents_the_errors_sent(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"200", "400", "401", "413", "429", "500", "503"} <= set(responses)
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    # the Guard's errors (Host, body size; the API key on /v1/) and an unexpected failure, on every route
    for path in ("/health", "/v1/models", "/metrics"):
        responses = schema["paths"][path]["get"]["responses"]
        assert {"200", "400", "413", "500"} <= set(responses) and "429" not in responses
        assert ("401" in responses) == path.startswith("/v1/") and ("503" in responses) == (path == "/health")
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    streamed = schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(streamed)
    assert streamed["application/json"]["schema"]["$ref"].endswith("/Completion")
    assert schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["anyOf"][0] == {"enum": [MODEL]}
    # and a bad request really is the 400 the schema says, in its shape
    r = httpx.post(server.url + "/v1/completions", json={"prompt": 5})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_the_host_header_is_checked_against_dns_rebinding(tiny_target, tiny_draft):
    """With allowed hosts (the default of `specgrove serve` on loopback), a request naming another host in Host
    (a page on an attacker's domain resolving to 127.0.0.1) gets 400 on every route; loopback names, with any
    port, are served."""
    from specgrove.serve.app import LOOPBACK_HOSTS

    with Server(tiny_target, tiny_draft, allowed_hosts=list(LOOPBACK_HOSTS)) as server:
        body = {"prompt": "abc", "max_tokens": 3, "temperature": 0}
        port = server.port
        for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.evil.example", ""):
            for method, path in (("POST", "/v1/completions"), ("GET", "/health"), ("GET", "/v1/models")):
                r = httpx.request(
                    method, server.url + path, json=body if method == "POST" else None, headers={"Host": host}
                )
                assert r.status_code == 400, (host, path, r.status_code)
                assert r.json()["error"]["code"] == 400 and "--allowed-hosts" in r.json()["error"]["message"]
        for host in (f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", f"[::1]:{port}", "[::1]"):
            assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host
            r = httpx.post(server.url + "/v1/completions", json=body, headers={"Host": host})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(tiny_target, "abc", 3)


def test_allowed_hosts_default_to_loopback_names_on_loopback_only():
    from specgrove.serve.server import allowed_hosts_for

    loopback = ["127.0.0.1", "::1", "localhost"]
    assert sorted(allowed_hosts_for("127.0.0.1", None)) == sorted(loopback)
    assert sorted(allowed_hosts_for("::1", None)) == sorted(loopback)
    assert sorted(allowed_hosts_for("localhost", None)) == sorted(loopback)
    assert sorted(allowed_hosts_for("127.0.0.2", None)) == sorted([*loopback, "127.0.0.2"])
    assert allowed_hosts_for("0.0.0.0", None) is None and allowed_hosts_for("192.168.1.5", None) is None
    assert allowed_hosts_for("0.0.0.0", "api.internal, 10.0.0.2") == ["api.internal", "10.0.0.2"]
    assert allowed_hosts_for("127.0.0.1", "*") is None
    with pytest.raises(ValueError, match="allowed-hosts"):
        allowed_hosts_for("127.0.0.1", " , ")


def test_a_top_p_below_float32s_range_is_greedy(server, tiny_target):
    """A top_p that rounds to 0 in float32 kept no token and sampled from NaN: 500 (schema fuzzing found
    top_p=5e-324). It keeps the most likely token, so it is greedy decoding."""
    for top_p in (5e-324, 1e-300):
        body = {"prompt": "abc", "max_tokens": 6, "temperature": 1.0, "top_p": top_p}
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(tiny_target, "abc", 6)


def test_a_chat_template_that_refuses_the_messages_is_a_400(tiny_target, tiny_draft):
    """A model's chat template may refuse messages (raise_exception: roles that do not alternate, a system
    message it has no place for): the request's fault, 400, not a 500."""
    refusing = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}h"
    )
    with Server(tiny_target, tiny_draft) as server:
        tiny_target.tokenizer.chat_template = refusing
        try:
            system = {"messages": [{"role": "system", "content": "a"}], "max_tokens": 2}
            r = httpx.post(server.url + "/v1/chat/completions", json=system)
            assert r.status_code == 400 and "System role not supported" in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"] == "messages"
            user = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
            assert httpx.post(server.url + "/v1/chat/completions", json=user).status_code == 200
        finally:
            tiny_target.tokenizer.chat_template = CHAT_TEMPLATE


def test_chunked_prefill_serves_the_same_text(tiny_target, tiny_draft):
    """--max-num-batched-tokens 3: a long prompt is prefilled over several steps beside running requests; every
    text is single-request greedy decoding's."""
    long_prompt = "abcabcbacbabcabcbacbabcabcbacb"
    prompts = ["abc", long_prompt, "cab", "bca"]
    with Server(
        tiny_target, tiny_draft, max_num_seqs=2, max_waiting=4, max_model_len=64, max_num_batched_tokens=3
    ) as s:

        def ask(prompt):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
            return r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(ask, prompts))
        assert s.engine.pool.in_use == 0 and s.proposer.pool.in_use == 0
    assert texts == [expected_text(tiny_target, p, 8) for p in prompts]


def test_a_prefilling_request_holds_its_row_against_the_queue_bound(tiny_target, tiny_draft, monkeypatch):
    """max_num_seqs 1, max_waiting 0: while a long prompt is prefilled a chunk at a time, it holds the only row
    (the running gauge says so) and the next request gets 429; then it finishes with the right text."""
    import threading

    original = SpecEngine.prefill
    holding, hold = threading.Event(), threading.Event()

    def held_prefill(self, seq, max_tokens=None):  # the second chunk waits until the test lets it go
        if seq.prefilled > 0 and not hold.is_set():
            holding.set()
            hold.wait(60)
        return original(self, seq, max_tokens)

    monkeypatch.setattr(SpecEngine, "prefill", held_prefill)
    long_prompt = "abcabcbacbabcabc"
    with Server(
        tiny_target, tiny_draft, max_num_seqs=1, max_waiting=0, max_model_len=64, max_num_batched_tokens=2
    ) as s:
        body = {"prompt": long_prompt, "max_tokens": 6, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=120)
            assert holding.wait(60)
            assert s.async_engine.scheduler.prefilling[0].prefilled == 2
            assert s.metric("specgrove_requests_running") == 1
            busy = httpx.post(s.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 2})
            hold.set()
            done = long.result()
        assert busy.status_code == 429
        assert done.status_code == 200 and done.json()["choices"][0]["text"] == expected_text(
            tiny_target, long_prompt, 6
        )
        assert s.engine.pool.in_use == 0


def greedy_output_ids(target, prompt_ids: list[int], max_tokens: int) -> list[int]:
    engine = SpecEngine(target, None, 0, max_model_len=48)
    return engine.generate(
        engine.new_sequence(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    ).output_ids


def raw_logprobs(target, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    ids = prompt_ids + output_ids
    cache = target.model.new_cache(1, len(ids) + 1)
    logits = target.model.forward(torch.tensor([ids]), torch.arange(len(ids))[None], cache)[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), -1)


def _stream_events(server, path, body) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_logprobs_are_the_targets(server, tiny_target):
    """completions' logprobs (0..5) and chat's logprobs + top_logprobs (0..20): the target's raw log-softmax of
    each emitted token, equal to a plain forward's over the whole output, streamed or not."""
    tokenizer = tiny_target.tokenizer
    prompt_ids = tokenizer.encode("abcab", add_special_tokens=False)
    output = greedy_output_ids(tiny_target, prompt_ids, 10)
    expected = raw_logprobs(tiny_target, prompt_ids, output)
    texts = [tokenizer.decode([t]) for t in output]
    body = {"prompt": "abcab", "max_tokens": 10, "temperature": 0, "logprobs": 3}
    full = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]
    events = _stream_events(server, "/v1/completions", body)
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"] and e["choices"][0]["logprobs"]]
    streamed = {key: [v for part in parts for v in part[key]] for key in full}
    assert streamed == full
    assert full["tokens"] == texts
    assert full["text_offset"] == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    for i, token in enumerate(output):
        assert abs(full["token_logprobs"][i] - float(expected[i, token])) < 1e-5
        top = full["top_logprobs"][i]
        assert 3 <= len(top) <= 4 and top[texts[i]] == full["token_logprobs"][i]
        best = expected[i].topk(3)
        for t, v in zip(best.indices.tolist(), best.values.tolist()):
            assert abs(top[tokenizer.decode([t])] - v) < 1e-5

    chat_prompt_ids = tokenizer.encode("abcabh", add_special_tokens=False)
    output = greedy_output_ids(tiny_target, chat_prompt_ids, 6)
    expected = raw_logprobs(tiny_target, chat_prompt_ids, output)
    chat = {"messages": [{"role": "user", "content": "abcab"}], "max_tokens": 6, "temperature": 0, "logprobs": True}
    for top in (None, 0, 5):
        request = chat if top is None else {**chat, "top_logprobs": top}
        content = httpx.post(server.url + "/v1/chat/completions", json=request).json()["choices"][0]["logprobs"]
        content = content["content"]
        events = _stream_events(server, "/v1/chat/completions", request)
        streamed = [c for e in events for ch in e["choices"] if ch["logprobs"] for c in ch["logprobs"]["content"]]
        assert streamed == content and len(content) == len(output)
        for i, (token, item) in enumerate(zip(output, content)):
            assert item["token"] == tokenizer.decode([token]) and item["bytes"] == list(item["token"].encode())
            assert abs(item["logprob"] - float(expected[i, token])) < 1e-5
            values = [t["logprob"] for t in item["top_logprobs"]]
            assert len(values) == (top or 0) and values == sorted(values, reverse=True)
            if top:
                assert torch.allclose(torch.tensor(values), expected[i].topk(top).values, atol=1e-5)
    plain = httpx.post(server.url + "/v1/chat/completions", json={**chat, "logprobs": False}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_n_choices(server, tiny_target):
    """n independent samples, indexed 0..n-1, usage summed with the prompt counted once; greedy gives n equal
    choices; with a seed the answer is reproducible and choice 0 is the n = 1 answer; streaming tags each chunk
    with its choice's index."""
    greedy = {"prompt": "abcab", "max_tokens": 6, "temperature": 0, "n": 3}
    out = httpx.post(server.url + "/v1/completions", json=greedy).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert {c["text"] for c in out["choices"]} == {expected_text(tiny_target, "abcab", 6)}
    assert out["usage"]["prompt_tokens"] == 5 and out["usage"]["completion_tokens"] == 18
    assert out["usage"]["total_tokens"] == 23
    assert out["usage"]["speculation"]["steps"] >= 3

    sampled = {"prompt": "abc", "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 4}
    a = httpx.post(server.url + "/v1/completions", json=sampled).json()
    b = httpx.post(server.url + "/v1/completions", json=sampled).json()
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]] and len(set(texts)) > 1
    one = httpx.post(server.url + "/v1/completions", json={**sampled, "n": 1}).json()
    assert one["choices"][0]["text"] == texts[0]

    events = _stream_events(server, "/v1/completions", {**sampled, "stream_options": {"include_usage": True}})
    streamed = ["", "", "", ""]
    for e in events:
        for c in e["choices"]:
            streamed[c["index"]] += c["text"]
    assert streamed == texts
    assert events[-1]["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]
    finishes = [c["index"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2, 3]

    chat = {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 5, "temperature": 0.9, "seed": 2, "n": 2}
    reply = httpx.post(server.url + "/v1/chat/completions", json=chat).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    events = _stream_events(server, "/v1/chat/completions", chat)
    contents = ["", ""]
    for e in events:
        for c in e["choices"]:
            contents[c["index"]] += c["delta"].get("content") or ""
    assert contents == [c["message"]["content"] for c in reply["choices"]]
    assert server.engine.pool.in_use == 0

    for bad in (0, 17):
        r = httpx.post(server.url + "/v1/completions", json={**greedy, "n": bad})
        assert r.status_code == 400 and "n" == r.json()["error"]["param"]
    # n counts n sequences against the queue: 2 rows + 3 waiting hold 5, not 6
    r = httpx.post(server.url + "/v1/completions", json={**greedy, "n": 6})
    assert r.status_code == 400 and "n=6" in r.json()["error"]["message"]


def test_the_servers_choices_are_the_apis(server, tiny_dirs):
    """Choice i of a request to the server is choice i of the same request through the Python API (both seed
    it with `sampling.choice_seed`), completions and chat alike."""
    llm = tiny_llm(tiny_dirs, max_model_len=48)
    llm.tokenizer.chat_template = CHAT_TEMPLATE
    body = {"prompt": "abc", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 11, "n": 3}
    served = httpx.post(server.url + "/v1/completions", json=body).json()
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=8, n=3)
    [api] = llm.generate("abc", params)
    texts = [c.text for c in api.outputs]
    assert [c["text"] for c in served["choices"]] == texts and len(set(texts)) > 1
    assert served["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in api.outputs)

    chat = {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 5, "temperature": 0.9, "seed": 2, "n": 4}
    reply = httpx.post(server.url + "/v1/chat/completions", json=chat).json()
    api_chat = llm.chat(chat["messages"], SamplingParams(temperature=0.9, seed=2, max_tokens=5, n=4))
    assert [c["message"]["content"] for c in reply["choices"]] == [c.text for c in api_chat.outputs]


def test_prompt_tokens_count_once_per_request(server):
    """specgrove_prompt_tokens_total counts a request's prompt once whatever its n, streamed or not: it adds up to
    the responses' usage, while the finished-requests counter counts every choice."""
    usage_prompt = 0
    for n, stream in ((3, False), (1, False), (3, True), (2, False)):
        body = {"prompt": "abcab", "max_tokens": 4, "temperature": 0.8, "seed": 3, "n": n}
        if stream:
            events = _stream_events(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
            usage = events[-1]["usage"]
        else:
            usage = httpx.post(server.url + "/v1/completions", json=body).json()["usage"]
        assert usage["prompt_tokens"] == 5
        usage_prompt += usage["prompt_tokens"]
        assert server.metric("specgrove_prompt_tokens_total") == usage_prompt
    assert server.metric("specgrove_requests_finished_total") == 3 + 1 + 3 + 2


def test_loadtest_summary_counts_failed_requests_and_error_events():
    """Failed requests stay out of the latency figures and are counted by status, the streams that ended with
    an error event among them (a replica that died mid-stream)."""
    from specgrove.serve.loadtest import summarize

    def result(status, start, end, error_event=False):
        return {
            "status": status,
            "error_event": error_event,
            "start": start,
            "end": end,
            "latency_s": end - start,
            "ttft_s": 0.1,
            "completion_tokens": 4 if status == 200 else 0,
        }

    row = summarize([result(200, 0, 1), result(503, 0, 9, True), result(503, 0, 8), result(429, 0, 0.1)])
    assert row["ok"] == 1 and row["requests"] == 4
    assert row["failed"] == {"429": 1, "503": 2} and row["error_events"] == 1
    assert row["mean_latency_s"] == 1 and row["completion_tokens"] == 4
    assert summarize([result(200, 0, 2)])["failed"] == {}


def test_drive_runs_a_request_through_the_app_and_stopping_it_aborts_the_request(server):
    """`replicas.drive`, what an engine replica runs for the router: the app's messages for a request equal
    what the same request gets over HTTP, and a drive stopped mid-stream (the router's client went away, or a
    cancelled call) aborts the request on the engine and frees its row."""
    from specgrove.serve.replicas import drive

    app = server.server.config.app
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", server.port),
    }
    body = {"model": MODEL, "prompt": "abcab", "max_tokens": 6, "temperature": 0}

    async def whole(request: dict) -> list[dict]:
        return [message async for message in drive(app, scope, json.dumps(request).encode())]

    messages = asyncio.run(whole(body))
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
    driven = json.loads(b"".join(m.get("body", b"") for m in messages[1:]))
    over_http = httpx.post(server.url + "/v1/completions", json=body).json()
    assert driven["choices"] == over_http["choices"] and driven["usage"] == over_http["usage"]
    refused = asyncio.run(whole({**body, "temperature": -1}))  # the app's own errors come through as they are
    refused_over_http = httpx.post(server.url + "/v1/completions", json={**body, "temperature": -1})
    assert refused[0]["status"] == refused_over_http.status_code == 400
    assert json.loads(refused[1]["body"]) == refused_over_http.json()

    aborted = '{finish_reason="abort"}'
    before = server.metric("specgrove_requests_finished_total", aborted)

    async def first_text_then_stop() -> bool:
        stream = drive(app, scope, json.dumps({**body, "max_tokens": 30, "stream": True}).encode())
        async for message in stream:
            if b'"text": "' in message.get("body", b"") and b'"text": ""' not in message["body"]:
                await stream.aclose()
                return True
        return False

    assert asyncio.run(first_text_then_stop()), "the stream never sent text"
    deadline = time.monotonic() + 60  # a bound on waiting, not a timed assertion
    while server.metric("specgrove_requests_finished_total", aborted) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("specgrove_requests_finished_total", aborted) == before + 1
    assert server.metric("specgrove_requests_running") == 0
