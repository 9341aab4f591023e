"""`specgrove serve --replicas N` on a local Ray cluster (127.0.0.1), 2 engine replicas of tiny models behind
the router.

- 30 concurrent streamed requests (completions and chat), different prompts and seeds, greedy and seeded
  sampling: each equals the same request served alone by one in-process engine, both replicas served some,
  and each replica's own metrics port counts what it served.
- A replica killed (SIGKILL) mid-load while its two rows' streams have begun: those two streams end with an
  error event after a prefix of their own text; every other request is served, correctly; the deployment is
  back to 2 healthy replicas without any action.
- A replica killed while it holds two chat streams it has sent nothing of: the router sends them again, and
  every request is served whole.
- A client that disconnects mid-stream: the replica aborts its request and frees the row.
- Requests beyond the replicas' rows and the router's queue: 429 with Retry-After.
- The router's Forwarder without Ray: a failure before the first byte is retried, one after ends the
  stream with an error event, a full queue is 429.
"""

import asyncio
import concurrent.futures
import functools
import json
import os
import random
import signal
import socket
import sys
import time

import httpx
import pytest

from specgrove.cli import build_parser
from specgrove.sampling import SamplingParams

if not os.environ.get("CI"):  # CI installs the ray extra: there these tests run, never skip
    pytest.importorskip("ray.serve")
import ray  # noqa: E402
from ray import serve  # noqa: E402

from specgrove.serve import replicas  # noqa: E402
from specgrove.serve.cli import serve_from_args  # noqa: E402

LETTERS = "abcdefgh"
# the tiny models' chat template: the messages' contents, then "h" to start the answer
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}h{% endif %}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gated_server(args, flag_dir):
    """The replica's server, whose engine stalls while the file stall-<pid> exists in flag_dir, so that a test
    knows what a replica holds when it is killed. The file's text is the mode: "idle", stall before any step
    (the requests it takes get nothing sent); "begun", stall once both rows run with tokens (their streams
    have begun). Stalled holding both rows, it writes their prompts' token ids to held-<pid>."""
    app, engines = serve_from_args(args, None)
    for engine in engines.values():
        engine.engine.tokenizer.chat_template = CHAT_TEMPLATE
        scheduler = engine.scheduler
        step = scheduler.step

        def holding(mode: str, scheduler=scheduler, engine=engine) -> list | None:
            seqs = [stream.seq for stream in list(engine.streams.values())]  # submitted, not finished
            if len(seqs) < scheduler.max_num_seqs:
                return None
            if mode == "begun" and not (
                len(scheduler.running) == scheduler.max_num_seqs and all(s.output_ids for s in scheduler.running)
            ):
                return None
            return [list(s.prompt_ids) for s in seqs]

        def gated_step(step=step, holding=holding):
            stall = os.path.join(flag_dir, f"stall-{os.getpid()}")
            while os.path.exists(stall):
                try:
                    mode = open(stall).read().strip()
                except FileNotFoundError:
                    break
                held = holding(mode)
                if mode == "begun" and held is None:
                    break  # step on until both rows run with tokens
                if held is not None:
                    with open(os.path.join(flag_dir, f"held-{os.getpid()}.tmp"), "w") as f:
                        json.dump(held, f)
                    os.replace(f.name, os.path.join(flag_dir, f"held-{os.getpid()}"))
                time.sleep(0.01)
            return step()

        scheduler.step = gated_step
    return app, engines


def test_serve_replicas_command(tiny_dirs):
    """`specgrove serve --replicas 2` as a user runs it: a local Ray instance, both replicas answering through
    the proxy, and SIGTERM (docker stop, systemd) ends it cleanly, with its Ray processes."""
    import subprocess

    port = free_port()
    command = [sys.executable, "-m", "specgrove.cli", "serve", "--replicas", "2", "--replica-cpus", "0.5"]
    command += ["--target", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft"]), "--dtype", "float32"]
    command += ["--policy", "fixed:2", "-k", "2", "--max-model-len", "64", "--port", str(port)]
    command += ["--served-model-name", "tiny", "--api-key", "secret", "--routers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.poll() is None, process.stderr.read()[-3000:]
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, "serve --replicas 2 to answer")
        body = {"model": "tiny", "prompt": "abcab", "max_tokens": 6, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401  # the key, per replica
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer secret"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 6
        assert httpx.get(url + "/-/healthz", timeout=30).status_code == 200  # the proxy's own, for liveness probes
        routers = subprocess.run(["pgrep", "-f", "ServeReplica:specgrove:router"], capture_output=True, text=True)
        assert len(routers.stdout.split()) == 2, routers  # --routers 2
    finally:
        process.terminate()
        code = process.wait(timeout=120)
    assert code == 0, process.stderr.read()[-3000:]


@pytest.mark.parametrize(
    ("flag", "value", "message"), [("--replicas", "0", "--replicas must be >= 1"), ("--routers", "0", "--routers")]
)
def test_scale_out_options_are_checked_before_anything_starts(tiny_dirs, capsys, flag, value, message):
    from specgrove.cli import main

    code = main(["serve", "--target", str(tiny_dirs["target"]), "--replicas", "2", flag, value])
    assert code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster(tiny_dirs, tmp_path_factory):
    flag_dir = str(tmp_path_factory.mktemp("flags"))
    port, metrics_port = free_port(), free_port()
    args = build_parser().parse_args(
        [
            "serve",
            "--target",
            str(tiny_dirs["target"]),
            "--draft",
            str(tiny_dirs["draft"]),
            "--dtype",
            "float32",
            "--policy",
            "fixed:3",
            "-k",
            "3",
            "--max-model-len",
            "64",
            "--max-num-seqs",
            "2",
            "--max-waiting",
            "16",
            "--served-model-name",
            "tiny",
        ]
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the gate is defined here, not in specgrove
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = replicas.application(
            functools.partial(gated_server, args, flag_dir),
            replicas=2,
            max_num_seqs=2,
            max_waiting=16,
            cpus_per_replica=0.5,
            num_threads=1,
            metrics_port=metrics_port,
        )
        serve.run(app, name=replicas.DEPLOYMENT, route_prefix="/")
        from specgrove.cli_options import build_llm

        llm, _ = build_llm(args, max_num_seqs=1)
        yield {"url": f"http://127.0.0.1:{port}", "flags": flag_dir, "engine": llm.engine, "metrics": metrics_port}
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_pids() -> dict[str, int]:
    """Replica actor name -> its process id."""
    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{replicas.DEPLOYMENT}#{replicas.ENGINE}#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pids[actor["name"]] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    return pids


def wait_for(predicate, what: str, limit_s: float = 180):
    """Poll until predicate() holds (a bound on waiting, not a timed assertion about speed)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def requests_(count: int, seed: int) -> list[dict]:
    """`count` streamed completions with distinct prompts, half greedy, half seeded sampling."""
    rng = random.Random(seed)
    out, prompts = [], set()
    for i in range(count):
        prompt = "".join(rng.choice(LETTERS[:4]) for _ in range(rng.randint(2, 7)))
        while prompt in prompts:
            prompt = "".join(rng.choice(LETTERS[:4]) for _ in range(rng.randint(2, 7)))
        prompts.add(prompt)
        sampled = i % 2 == 1
        body = {"model": "tiny", "prompt": prompt, "max_tokens": rng.randint(8, 24), "stream": True}
        body.update({"temperature": 1.0, "seed": 1000 + i} if sampled else {"temperature": 0})
        out.append(body)
    return out


def as_chat(body: dict) -> dict:
    """The same request as a streamed chat completion (one user message holding the prompt)."""
    chat = {k: v for k, v in body.items() if k != "prompt"}
    return {**chat, "messages": [{"role": "user", "content": body["prompt"]}]}


def prompt_text(body: dict) -> str:
    """The text the target reads: a completion's prompt, or a chat's messages through CHAT_TEMPLATE."""
    return body["prompt"] if "prompt" in body else "".join(m["content"] for m in body["messages"]) + "h"


def served_alone(engine, body: dict) -> list[int]:
    ids = engine.tokenizer.encode(prompt_text(body), add_special_tokens=False)
    params = SamplingParams(
        temperature=body["temperature"], seed=body.get("seed"), max_tokens=body["max_tokens"], ignore_eos=False
    )
    return engine.generate(engine.new_sequence(ids, params)).text


def stream(url: str, body: dict, texts_at: dict | None = None, key=None) -> dict:
    """One streamed completion: its text, whether [DONE] came, an error event if one came, and (in
    texts_at[key]) when its first text arrived."""
    text, done, error = "", False, None
    chat = "messages" in body
    try:
        with httpx.stream(
            "POST", url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body, timeout=300
        ) as r:
            if r.status_code != 200:
                return {"status": r.status_code, "text": r.read().decode(), "done": False}
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"]
                        continue
                    choice = chunk["choices"][0]
                    text += (choice["delta"].get("content") or "") if chat else choice["text"]
                    if texts_at is not None and text:
                        texts_at.setdefault(key, time.monotonic())
        return {"status": 200, "text": text, "done": done and error is None, "error": error}
    except httpx.HTTPError as cut:  # a stream cut without an event: what the router must prevent
        return {"status": 200, "text": text, "done": False, "error": None, "cut": repr(cut)}


def metric(port: int, name: str, label: str = "") -> float:
    """A replica's counter on its own metrics port, summed over its series (those with `label`, e.g.
    'finish_reason="abort"', if given)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{")) and label in line
    )


def test_thirty_concurrent_streams_equal_requests_served_alone(cluster):
    bodies = [as_chat(b) if i % 3 == 2 else b for i, b in enumerate(requests_(30, seed=0))]
    expected = [served_alone(cluster["engine"], b) for b in bodies]
    before = [metric(cluster["metrics"] + rank, "specgrove_requests_finished_total") for rank in (0, 1)]
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        results = list(pool.map(functools.partial(stream, cluster["url"]), bodies))
    for body, want, got in zip(bodies, expected, results):
        assert got["status"] == 200 and got["done"], (body, got)
        assert got["text"] == want, (body, got)
    served = [metric(cluster["metrics"] + rank, "specgrove_requests_finished_total") - before[rank] for rank in (0, 1)]
    assert sum(served) == 30 and min(served) > 0, served  # both replicas served, and each counts its own
    health = httpx.get(cluster["url"] + "/health").json()
    assert health["status"] == "ok"


def kill_holding_victim(cluster, mode: str, bodies: list[dict]):
    """Stall one replica (mode as `gated_server`'s), send `bodies` concurrently, kill the replica with SIGKILL
    once it holds two of them (and, in mode "begun", once their first text reached the client), and return
    (the results, the indices of the requests the victim held), after checking that the deployment is back
    to 2 healthy replicas without any action."""
    flags, engine = cluster["flags"], cluster["engine"]
    pids = replica_pids()
    assert len(pids) == 2, pids
    victim_name, victim = sorted(pids.items())[0]
    stall, held_file = os.path.join(flags, f"stall-{victim}"), os.path.join(flags, f"held-{victim}")
    with open(stall, "w") as f:
        f.write(mode)
    prompt_ids = [engine.tokenizer.encode(prompt_text(b), add_special_tokens=False) for b in bodies]
    texts_at: dict[int, float] = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(stream, cluster["url"], b, texts_at, i) for i, b in enumerate(bodies)]
            wait_for(lambda: os.path.exists(held_file), "the victim to hold two requests")
            with open(held_file) as f:
                held = [prompt_ids.index(ids) for ids in json.load(f)]
            if mode == "begun":
                wait_for(lambda: all(i in texts_at for i in held), "the held streams' first text")
            else:
                assert not any(i in texts_at for i in held), "nothing of an idle replica's requests was sent"
            os.kill(victim, signal.SIGKILL)
            results = [f.result() for f in futures]
    finally:
        for path in (stall, held_file):
            if os.path.exists(path):
                os.remove(path)

    def replaced() -> bool:
        try:
            now = replica_pids()
        except Exception:  # a replica starting or stopping
            return False
        status = serve.status().applications[replicas.DEPLOYMENT]
        return len(now) == 2 and victim_name not in now and status.status == "RUNNING"

    wait_for(replaced, "the dead replica to be replaced")
    return results, held


def test_a_killed_replica_ends_its_begun_streams_with_an_error_event(cluster):
    bodies = requests_(16, seed=1)
    for body in bodies:
        body["max_tokens"] = 40  # the held rows cannot finish before the kill
    expected = [served_alone(cluster["engine"], b) for b in bodies]
    results, held = kill_holding_victim(cluster, "begun", bodies)
    for i, (body, want, got) in enumerate(zip(bodies, expected, results)):
        assert "cut" not in got, (body, got)  # every stream ends with [DONE], none is cut
        if i in held:  # begun on the victim: an error event after a prefix of its own text, never another's
            assert got["error"] is not None and got["error"]["code"] == 503, (body, got)
            assert got["text"] and want.startswith(got["text"]), (body, got)
        else:
            assert got["done"] and got["text"] == want, (body, got)
    r = httpx.post(cluster["url"] + "/v1/completions", json=dict(bodies[0], stream=False), timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[0]


def test_a_killed_replica_loses_no_request_it_had_not_begun(cluster):
    """The victim holds two requests it has sent nothing of (not even headers: the router holds them back, and a
    chat stream's role chunk waits for its first text): the router sends both again, so every request, chat
    here, is served whole, as if no replica had died."""
    bodies = [as_chat(b) for b in requests_(16, seed=2)]  # so the two held are chat streams
    expected = [served_alone(cluster["engine"], b) for b in bodies]
    results, held = kill_holding_victim(cluster, "idle", bodies)
    assert len(held) == 2
    for body, want, got in zip(bodies, expected, results):
        assert got["done"] and got["text"] == want, (body, got)


def test_a_client_that_disconnects_frees_its_row(cluster):
    """A stream closed by its client after its first text: the router cancels the call, the replica aborts
    the request (finish_reason "abort") and its running gauge returns to 0."""
    ports = [cluster["metrics"] + rank for rank in (0, 1)]

    def aborted() -> float:
        return sum(metric(p, "specgrove_requests_finished_total", 'finish_reason="abort"') for p in ports)

    before = aborted()
    body = {"model": "tiny", "prompt": "abcd", "max_tokens": 50, "temperature": 0, "stream": True}
    with httpx.stream("POST", cluster["url"] + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # the first text: hang up
    wait_for(lambda: aborted() == before + 1, "the replica to abort the request")
    wait_for(lambda: sum(metric(p, "specgrove_requests_running") for p in ports) == 0, "the row to be freed")


def test_a_full_queue_is_refused_with_429_and_retry_after(cluster):
    """Both replicas stalled: each holds its max_num_seqs = 2 requests and the router queues --max-waiting = 16
    per replica; a request beyond that gets 429 with Retry-After, as from the single-process server, and the
    rest are all served once the replicas go on."""
    flags, url = cluster["flags"], cluster["url"]
    pids = replica_pids()
    stalls = [os.path.join(flags, f"stall-{pid}") for pid in pids.values()]
    for stall in stalls:
        with open(stall, "w") as f:
            f.write("idle")
    bodies = [dict(b, stream=False, max_tokens=6) for b in requests_(40, seed=3)]
    expected = [served_alone(cluster["engine"], b) for b in bodies]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/completions", json=b, timeout=300) for b in bodies]
            wait_for(lambda: any(f.done() for f in futures), "a request over the queue to be refused")
            time.sleep(2)  # let the last requests reach the router before the replicas go on
            for stall in stalls:
                os.remove(stall)
            results = [f.result() for f in futures]
    finally:
        for name in os.listdir(flags):
            os.remove(os.path.join(flags, name))
    refused = [r for r in results if r.status_code == 429]
    assert 1 <= len(refused) <= len(bodies) - 2 * (2 + 16), [r.status_code for r in results]
    for r in refused:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error", r.text
    for body, want, r in zip(bodies, expected, results):
        if r.status_code != 429:
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (body, r.text)


# ---- the router's Forwarder, without Ray ------------------------------------------------------------------
class ReplicaDied(Exception):
    pass


class QueueFull(Exception):
    pass


def forwarder_call(outcomes: list):
    """A fake engine call: each call takes the next outcome, (messages to send, then an exception or None)."""
    calls = []

    async def call(scope, body):
        calls.append(body)
        messages, error = outcomes[len(calls) - 1]
        for message in messages:
            yield message
        if error is not None:
            raise error

    return call, calls


def run_forwarder(outcomes: list, attempts: int = 3) -> tuple[list[dict], list, replicas.Forwarder]:
    call, calls = forwarder_call(outcomes)
    forwarder = replicas.Forwarder(
        call, attempts, is_failure=lambda e: isinstance(e, ReplicaDied), is_full=lambda e: isinstance(e, QueueFull)
    )
    sent = []
    incoming = [{"type": "http.request", "body": b'{"a":', "more_body": True}, {"type": "http.request", "body": b"1}"}]

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # the client stays

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "state": object()}
    asyncio.run(forwarder(scope, receive, send))
    return sent, calls, forwarder


SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def sse_body(text: str, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": more}


def test_forwarder_sends_again_a_request_failed_before_its_first_byte():
    final = [SSE_START, sse_body("x"), sse_body("[DONE]", more=False)]
    sent, calls, forwarder = run_forwarder([([SSE_START], ReplicaDied()), ([], ReplicaDied()), (final, None)])
    assert calls == [b'{"a":1}'] * 3 and forwarder.resent == 2
    assert sent == final  # the client saw one response, the third call's


def test_forwarder_ends_a_begun_stream_with_an_error_event():
    sent, calls, _ = run_forwarder([([SSE_START, sse_body("x")], ReplicaDied()), ([], None)])
    assert len(calls) == 1  # never sent again: the client has part of it
    assert sent[:2] == [SSE_START, sse_body("x")]
    events = sent[2]["body"].decode().split("\n\n")
    assert json.loads(events[0][6:])["error"]["code"] == 503 and events[1] == "data: [DONE]"
    assert sent[2]["more_body"] is False


def test_forwarder_gives_up_after_its_attempts_and_answers_full_queues_with_429():
    sent, calls, _ = run_forwarder([([], ReplicaDied())] * 2, attempts=2)
    assert len(calls) == 2 and sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["type"] == "server_error"
    sent, calls, _ = run_forwarder([([], QueueFull("full"))])
    assert len(calls) == 1 and sent[0]["status"] == 429 and (b"retry-after", b"1") in sent[0]["headers"]
    sent, _, _ = run_forwarder([([], KeyError("bug"))])  # an error of the request itself: 500, not retried
    assert sent[0]["status"] == 500 and "KeyError" in json.loads(sent[1]["body"])["error"]["message"]
