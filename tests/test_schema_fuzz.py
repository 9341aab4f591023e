"""Schema fuzzing: schemathesis generates requests from the server's own OpenAPI schema (`/openapi.json`) and
sends them over loopback to a server on the tiny models (test_server's `Server`), with the Host check of
`specgrove serve` on loopback. Every answer must be one the schema documents: no 5xx, a status the route lists,
a body (JSON, or each server-sent event) of that status' schema and content type; a request the schema calls
invalid must be refused (4xx).

Requests valid by the schema (also streamed) and invalid ones (POST routes only: the GET routes take no input)
are generated; about 100 in all, derandomized, so CI sends the same requests on every run. Generation stays
short although the schema allows any max_tokens: the tiny server's max_model_len (48) refuses a larger explicit
max_tokens with 400, and without one the room left in the context bounds it.

CI's budget is a smoke test; `SPECGROVE_FUZZ_SCALE=12 python -m pytest tests/test_schema_fuzz.py` sends 12
times the requests. A run of that size found top_p=5e-324 -> 500 (regressions in test_server.py and
test_sampling.py).
"""

import collections
import os

import httpx
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from specgrove.serve.app import LOOPBACK_HOSTS

from test_server import Server

SCALE = int(os.environ.get("SPECGROVE_FUZZ_SCALE", "1"))
# requests per POST route: valid ones, valid ones streamed (so that every run checks events against the
# schema), invalid ones; a GET route takes no input and gives one request
EXAMPLES = {"positive": 20 * SCALE, "streamed": 10 * SCALE, "negative": 15 * SCALE}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


# one request each valid mode of a POST route sends first, so that every run checks a generated answer of each
# kind against the schema (the tiny model's tokenizer makes most generated text prompts empty: 400)
SERVED = {
    "/v1/completions": {"prompt": "abcab", "max_tokens": 4, "stop": ["d"]},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 4, "seed": 3},
}


def streamed(case):
    if isinstance(case.body, dict):
        case.body = {**case.body, "stream": True}
    return case


def cases(operation, mode: str):
    if mode == "negative":
        return operation.as_strategy(GenerationMode.NEGATIVE)
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    return strategy.map(streamed) if mode == "streamed" else strategy


def fuzz(server: Server, operation, mode: str, answers: collections.Counter) -> None:
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,  # a step of the engine is not a property of the request
        derandomize=True,
        database=None,
        # a route without input gives one example; a prompt is mostly refused (400): both are expected here
        suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases(operation, mode))
    def check(case):
        response = case.call(base_url=server.url, timeout=60)
        events = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
        answers[operation.label, mode, "events" if events else response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    if operation.path in SERVED and mode != "negative":
        body = SERVED[operation.path]
        if mode == "streamed":
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        check = example(case=operation.Case(body=body, media_type="application/json"))(check)
    check()


def test_every_answer_is_one_the_schema_documents(tiny_target, tiny_draft):
    with Server(tiny_target, tiny_draft, allowed_hosts=list(LOOPBACK_HOSTS)) as server:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} == {
            "GET /health",
            "GET /v1/models",
            "GET /metrics",
            "POST /v1/completions",
            "POST /v1/chat/completions",
        }
        answers = collections.Counter()
        for operation in operations:
            for mode in EXAMPLES if operation.method.upper() == "POST" else ["positive"]:
                fuzz(server, operation, mode, answers)
        # both POST routes answered (JSON and events) and refused
        for label in ("POST /v1/completions", "POST /v1/chat/completions"):
            assert answers[label, "streamed", "events"] > 0 and answers[label, "negative", 400] > 0, answers
            assert answers[label, "positive", 200] > 0, answers
        assert 50 * SCALE <= sum(answers.values()) <= 100 * SCALE, answers
        # and nothing was left behind
        assert httpx.get(server.url + "/health").status_code == 200
        assert server.engine.pool.in_use == 0
