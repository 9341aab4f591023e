"""Schema fuzzing: schemathesis generates requests from the server's own OpenAPI schema (`/openapi.json`) and
sends them over loopback to a server on the tiny models (test_server's `Server`), with the Host check of
`specgrove serve` on loopback. Every answer must be one the schema documents: no 5xx, a status the route lists,
a body of that status' schema and content type; a request the schema calls invalid must be refused (4xx).

Requests valid by the schema (positive) and invalid ones (negative, POST routes only: the GET routes take no
input) are generated; about 100 in all, derandomized, so CI sends the same requests on every run. Generation
stays short although the schema allows any max_tokens: the tiny server's max_model_len (48) refuses a larger
explicit max_tokens with 400, and without one the room left in the context bounds it.

Finds so far (regressions in test_server.py, test_sampling.py): a top_p that rounds to 0 in float32 (500).
"""

import collections

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
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

# requests per route and mode (a route without input gives one request whatever this says)
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 20}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def fuzz(server: Server, operation, mode: GenerationMode, statuses: collections.Counter) -> None:
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,  # a step of the engine is not a property of the request
        derandomize=True,
        database=None,
        # a route without input gives one example; a prompt is mostly refused (400): both are expected here
        suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=operation.as_strategy(mode))
    def check(case):
        response = case.call(base_url=server.url, timeout=60)
        statuses[operation.label, mode.value, response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

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
        statuses = collections.Counter()
        for operation in operations:
            for mode in EXAMPLES if operation.method.upper() == "POST" else [GenerationMode.POSITIVE]:
                fuzz(server, operation, mode, statuses)
        # the fuzzing reached generation (200s) and the refusals (400s) of both POST routes
        for label in ("POST /v1/completions", "POST /v1/chat/completions"):
            assert statuses[label, "positive", 200] + statuses[label, "positive", 400] > 0
            assert statuses[label, "negative", 400] > 0
        assert statuses["POST /v1/chat/completions", "positive", 200] > 0
        assert 50 <= sum(statuses.values()) <= 110, statuses
        # and nothing was left behind
        assert httpx.get(server.url + "/health").status_code == 200
        assert server.engine.pool.in_use == 0
