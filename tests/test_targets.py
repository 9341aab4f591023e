"""One server, several targets, one sorted draft (`specgrove serve --targets a,b --sorted-draft DIR`), on tiny
models over loopback: the draft is loaded once and shared, each target keeps its own engine, thresholds and
counters; a request's `model` picks its target; interleaved requests for both equal each target's plain
decoding and are never mixed; Prometheus series carry the target as model_name."""

import concurrent.futures
import json

import httpx
import pytest

from specgrove.cli import build_parser, main
from specgrove.engine.engine import SpecEngine
from specgrove.models.loader import load_model
from specgrove.models.sorted import SortedSpec, build_sorted
from specgrove.sampling import SamplingParams
from specgrove.serve.cli import serve_from_args, target_args
from specgrove.serve.loadtest import ServerThread
from specgrove.testing import make_tiny_model

from test_server import CHAT_TEMPLATE, metric_value

PROMPTS = ["abc", "bca", "cab", "abcd", "dcba", "aab", "bba", "cca"]


@pytest.fixture(scope="module")
def dirs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    second = make_tiny_model(root / "second", "qwen2", 8, seed=4, init_scale=2.0, with_tokenizer=True)
    draft = build_sorted(
        make_tiny_model(root / "base", "qwen2", 8, seed=1, init_scale=2.0, with_tokenizer=True, num_hidden_layers=4),
        [1, 2, 4],
        root / "sorted",
        thresholds=[0.55, 0.45, 0.0],
    )
    spec = SortedSpec.load(draft)
    spec.target_thresholds = {str(second): [1.0, 1.0, 0.0]}  # by model name: the second target uses its last exit
    spec.save(draft)
    return {"first": tiny_dirs["target"], "second": second, "draft": draft}


def serve_args(dirs, *extra):
    return build_parser().parse_args(
        [
            "serve",
            "--targets",
            f"{dirs['first']},{dirs['second']}",
            "--sorted-draft",
            str(dirs["draft"]),
            "--served-model-name",
            "first,second",
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
            *extra,
        ]
    )


def plain_text(directory, prompt: str, max_tokens: int) -> str:
    target = load_model(directory, dtype="float32")
    engine = SpecEngine(target, None, 0, max_model_len=64)
    ids = target.tokenizer.encode(prompt, add_special_tokens=False)
    return engine.generate(engine.new_sequence(ids, SamplingParams(temperature=0, max_tokens=max_tokens))).text


def test_two_targets_share_one_sorted_draft(dirs, tmp_path, capsys):
    app, engines = serve_from_args(serve_args(dirs), None)
    assert list(engines) == ["first", "second"]
    first, second = (engines[name].engine for name in ("first", "second"))
    assert first.proposer.draft is second.proposer.draft  # loaded once
    assert first.proposer is not second.proposer and first.pool is not second.pool  # own state, own cache rows
    assert first.proposer.thresholds == [0.55, 0.45, 0.0] and second.proposer.thresholds == [1.0, 1.0, 0.0]
    expected = {(m, p): plain_text(dirs[m], p, 12) for m in ("first", "second") for p in PROMPTS}
    assert any(expected["first", p] != expected["second", p] for p in PROMPTS)  # the targets differ

    with ServerThread(app) as server:
        models = httpx.get(server.url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["first", "second"]
        health = httpx.get(server.url + "/health").json()
        assert health["status"] == "ok" and set(health["models"]) == {"first", "second"}

        def send(job):
            model, prompt, stream = job
            body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream}
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            if not stream:
                return job, r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            assert all(c["model"] == model for c in chunks)
            return job, "".join(c["choices"][0]["text"] for c in chunks), None

        jobs = [(m, p, i % 3 == 0) for i, p in enumerate(PROMPTS) for m in ("first", "second")]  # interleaved
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(send, jobs))
        tokens = {"first": 0, "second": 0}
        for (model, prompt, _), text, _ in results:
            assert text == expected[model, prompt], (model, prompt)
        for (model, prompt, _), _, _ in results:
            tokens[model] += len(expected[model, prompt])  # one letter per token in the tiny vocabulary

        metrics = httpx.get(server.url + "/metrics").text
        for model in ("first", "second"):
            label = f'{{model_name="{model}"}}'
            assert metric_value(metrics, "specgrove_generated_tokens_total", label) == tokens[model]
            assert metric_value(metrics, "specgrove_requests_finished_total", label) == len(PROMPTS)
        assert metric_value(metrics, "specgrove_requests_finished_total") == 2 * len(PROMPTS)

        r = httpx.post(server.url + "/v1/completions", json={"model": "third", "prompt": "abc", "max_tokens": 2})
        assert r.status_code == 400 and "'first', 'second'" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 12, "temperature": 0})
        assert r.json()["choices"][0]["text"] == expected["first", "abc"]  # no model: the first target
        assert second.proposer.exit_counts and set(second.proposer.exit_counts) == {4}  # its own thresholds

        # `specgrove loadtest --url` against this running server, on the model it names
        second.tokenizer.chat_template = CHAT_TEMPLATE
        questions = tmp_path / "q.jsonl"
        questions.write_text(
            "".join(json.dumps({"question_id": i, "category": "c", "turns": [t]}) + "\n" for i, t in enumerate(PROMPTS))
        )
        out = tmp_path / "lt"
        common = ["--rates", "50", "--requests", "4", "--max-tokens", "5", "--data", str(questions)]
        assert main(["loadtest", "--url", server.url, "--model", "second", *common, "--out", str(out)]) == 0
        report = json.loads((tmp_path / "lt.json").read_text())
        assert report["config"]["target"] == "second" and len(report["results"]) == 1
        assert report["results"][0]["ok"] == 4 and report["results"][0]["completion_tokens"] == 20
        assert main(["loadtest", "--url", server.url, "--model", "third", *common, "--out", str(out)]) == 2
        assert "not 'third'" in capsys.readouterr().err


def test_targets_options_are_checked(dirs):
    args = serve_args(dirs)
    assert [a.target for a in target_args(args)] == [str(dirs["first"]), str(dirs["second"])]
    assert all(a.method == "sorted" and a.draft == str(dirs["draft"]) for a in target_args(args))
    for name, value, message in (
        ("served_model_name", "only-one", "one per target"),
        ("draft", "x", "not both"),
        ("method", "prompt_lookup", "does not go with"),
    ):
        bad = serve_args(dirs)
        setattr(bad, name, value)
        with pytest.raises(ValueError, match=message):
            target_args(bad)
    twice = serve_args(dirs)
    twice.targets = f"{dirs['first']},{dirs['first']}"
    twice.served_model_name = None
    with pytest.raises(ValueError, match="must not repeat"):
        target_args(twice)
