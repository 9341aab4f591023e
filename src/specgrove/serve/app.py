"""An OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream over SSE with `stream: true`;
`stream_options.include_usage` adds a final usage chunk), GET /v1/models, GET /health, GET /metrics
(Prometheus). Usage carries this request's speculation statistics under "speculation". `n` choices are n
sequences (`submit`); `logprobs` / `top_logprobs` are the target's raw log-probabilities (`logprobs_json`).

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: malformed JSON, wrong field
types, out-of-range values, a prompt too long for the context, a Host header not allowed -> 400; a full
queue -> 429; a failure inside generation -> 500 for that request only; the engine loop down -> 503.

The endpoints are module-level functions on `router`; `build_app` keeps what they share (each served
target's engine under its model name, `ServerState`, in `Served`) on `app.state.served`, and they get it
through `Depends`. A request's `model` picks its target; a server of several targets (one sorted draft
shared by them, `specgrove serve --targets a,b`) lists them all in /v1/models.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from specgrove.engine.engine import first_stop
from specgrove.engine.scheduler import QueueFullError
from specgrove.engine.sequence import Sequence, TokenLogprob
from specgrove.errors import SpecgroveError
from specgrove.sampling import (
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    SamplingParams,
    choice_params,
)
from specgrove.serve.async_engine import AsyncEngine, Delta, RequestStream, usage_of

DISCONNECT_POLL_S = 0.5
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# The largest request body read by default: a prompt filling a 32k-token context is ~130 kB of text, so 2 MiB
# leaves room for long contexts while a 5 MB body is refused before it is read or tokenized.
MAX_BODY_BYTES = 2 * 1024 * 1024


# ---- request bodies ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bounds: completions' logprobs, chat's top_logprobs
MAX_TOP_LOGPROBS = 20


def accepts(default: Any, **schema: Any) -> Any:
    """A field whose JSON schema documents the values the server accepts (`schema`: JSON Schema keywords). The
    checks themselves stay where the values are used (SamplingParams, prepare), with messages that say what
    to do; tests/test_schema_fuzz.py sends values outside these and expects them refused."""
    return Field(default, json_schema_extra=schema)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # the schema names the served model (openapi_schema)
    max_tokens: StrictInt | None = accepts(None, minimum=1)
    temperature: StrictFloat = accepts(1.0, minimum=0, maximum=MAX_TEMPERATURE)
    top_p: StrictFloat = accepts(1.0, exclusiveMinimum=0, maximum=1)
    top_k: StrictInt = accepts(0, minimum=-1)
    min_p: StrictFloat = accepts(0.0, minimum=0, maximum=1)
    seed: StrictInt | None = accepts(None, minimum=-MAX_SEED - 1, maximum=MAX_SEED)
    stop: str | list[str] | None = accepts(None, minLength=1, items={"minLength": 1})
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = accepts(1, minimum=1, maximum=MAX_N)
    ignore_eos: StrictBool = False
    presence_penalty: StrictFloat = accepts(0.0, minimum=-2, maximum=2)
    frequency_penalty: StrictFloat = accepts(0.0, minimum=-2, maximum=2)
    repetition_penalty: StrictFloat = accepts(  # vLLM's extension
        1.0, minimum=MIN_REPETITION_PENALTY, maximum=MAX_REPETITION_PENALTY
    )
    user: str | None = None
    # Fields that change what a response means. The server does not honour them yet, so a request that sets
    # one (to anything but its neutral value, UNHONOURED) is refused rather than answered as if it had not.
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    suffix: Any = None
    best_of: Any = None


class CompletionRequest(_Common):
    # one prompt: text, token ids, or a list of one text
    prompt: (
        Annotated[str, accepts(..., minLength=1)]
        | Annotated[list[StrictInt], accepts(..., minItems=1, items={"type": "integer", "minimum": 0})]
        | Annotated[list[str], accepts(..., minItems=1, maxItems=1, items={"type": "string", "minLength": 1})]
    )
    max_tokens: StrictInt | None = accepts(COMPLETION_MAX_TOKENS, minimum=1)
    echo: StrictBool = accepts(False, const=False)
    # 0..5: the emitted token's and the most likely tokens' log-probabilities
    logprobs: StrictInt | None = accepts(None, minimum=0, maximum=MAX_COMPLETION_LOGPROBS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # text, or OpenAI's content parts, all of them text
    content: str | list[dict[str, Any]] | None = accepts(
        None,
        items={
            "type": "object",
            "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        },
    )


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = accepts(None, minimum=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = accepts(None, minimum=0, maximum=MAX_TOP_LOGPROBS)  # with logprobs: true


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
):
    return JSONResponse(error_body(status, message, kind, param), status_code=status, headers=headers)


# A client told 429 waits this long before it retries (a step of the batch frees rows within it).
RETRY_AFTER_S = 1


# ---- what the handlers share -------------------------------------------------------------------------
@dataclass
class ServerState:
    """One served target: its engine and the name clients send as `model`."""

    engine: AsyncEngine
    model_name: str

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len


@dataclass
class Served:
    """What every handler needs: the served targets, by name, in order (the first is the default when a
    request names no model); build_app keeps it on `app.state.served`."""

    targets: dict[str, ServerState]

    def pick(self, model: str | None) -> ServerState:
        if model is None:
            return next(iter(self.targets.values()))
        if model not in self.targets:
            served = ", ".join(repr(name) for name in self.targets)
            raise BadRequest(f"model {model!r} is not served here; this server serves {served}", "model")
        return self.targets[model]

    @property
    def engines(self) -> list[AsyncEngine]:
        return [target.engine for target in self.targets.values()]


def served_state(request: Request) -> Served:
    return request.app.state.served


router = APIRouter()


# ---- the app -----------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    engines = app.state.served.engines
    for engine in engines:
        engine.start()
    yield
    for engine in engines:
        engine.stop()


def build_app(
    engine: AsyncEngine | dict[str, AsyncEngine],
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The app over one engine serving `model_name`, or over several targets ({model name: engine}, the first
    the default; their metrics must share one registry, `serve.metrics.MetricFamilies`). `api_key`: every /v1/
    request must send `Authorization: Bearer <api_key>` (else 401); /health and /metrics stay open, as vLLM's.
    `max_body_bytes`: larger request bodies get 413 before they are read. `allowed_hosts`: host names (any
    port) a request's Host header may name, else 400 on every route; None or "*" among them: no check."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    engines = engine if isinstance(engine, dict) else {model_name: engine}
    if not engines or any(not name for name in engines):
        raise ValueError("build_app needs at least one engine, each with a model name")
    if len({id(e.metrics.registry) for e in engines.values()}) != 1:
        raise ValueError("the targets' metrics must share one registry (give each ServerMetrics the same families)")
    app = FastAPI(title="specgrove", version="0.1.0", lifespan=lifespan)
    app.state.served = Served({name: ServerState(e, name) for name, e in engines.items()})
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(router)
    hosts = None if allowed_hosts is None or "*" in allowed_hosts else {host_name(h) for h in allowed_hosts}
    app.add_middleware(Guard, api_key=api_key or None, max_body_bytes=max_body_bytes, allowed_hosts=hosts)
    app.openapi = lambda: openapi_schema(app)
    return app


def error_statuses(path: str, method: str) -> dict[str, str]:
    """The error statuses a route sends, each with what it means: the Guard's on every route (400 for a Host
    header not allowed, 413 for a large body; 401 on /v1/ with --api-key), 500 for an unexpected failure, and
    the completions' own (a bad request, a full queue, the engine down)."""
    completion = method == "post"
    statuses = {
        "400": ("a malformed or unservable request, or " if completion else "")
        + "a Host header not in --allowed-hosts",
        "401": "a missing or wrong API key (with --api-key)",
        "413": "a body over --max-body-bytes",
        "429": "the queue is full; retry after Retry-After seconds",
        "500": ("this request failed inside generation, or " if completion else "") + "an unexpected failure",
        "503": "the engine is not running",
    }
    if not path.startswith("/v1/"):
        del statuses["401"]
    if not completion:
        del statuses["429"]
        if path != "/health":
            del statuses["503"]
    return statuses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- what the endpoints answer: models for the OpenAPI schema only (the handlers build plain dicts; the schema
# fuzzing of tests/test_schema_fuzz.py checks every answer against these) -----------------------------------
class Speculation(BaseModel):
    steps: int
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    accepted_per_position: list[int]
    mean_accept_length: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculation: Speculation


class _Answer(BaseModel):
    id: str
    created: int
    model: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """The target's raw log-probability of each token, and of its most likely alternatives (logprobs: true)."""

    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    """OpenAI's completions logprobs: each token, its log-probability, the top tokens' (and its own) by text,
    and where it starts in the text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None
    stop_reason: int | str | None  # the stop token id or stop string that ended it, as vLLM's


class Completion(_Answer):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatLogprobs | None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class CompletionChunk(_Answer):
    """An event of a streamed completion; with stream_options.include_usage every chunk has usage: null and a
    last one, without choices, the request's usage."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChunkDelta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None


class ChatCompletionChunk(_Answer):
    """An event of a streamed chat completion: the first delta names the role; usage as CompletionChunk's."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TargetLoad(BaseModel):
    running: int
    waiting: int


class Health(BaseModel):
    status: Literal["ok"]
    running: int
    waiting: int
    models: dict[str, TargetLoad]


def sse_event(chunk: type[BaseModel]) -> dict:
    """One server-sent event of a stream, as Open API describes an event (before 3.2, the schema of an event
    stream is that of each event): its data is a chunk or an error as JSON, or the last event's [DONE]."""
    payload = {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [schema_ref(chunk), schema_ref(ErrorResponse)]},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string", "if": {"const": "[DONE]"}, "else": payload}},
    }


def schema_ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def add_schemas(components: dict, *models: type[BaseModel]) -> None:
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema


STREAM_CHUNKS = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema with the responses this server really sends: the errors of `error_statuses` (400, not
    FastAPI's 422, which it never sends), all in OpenAI's error shape; a completion's 200 as JSON or, with
    `stream: true`, server-sent events; /metrics' 200 as Prometheus text; the request fields' accepted values
    (`accepts`, the served model's name, the neutral values of UNHONOURED)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    add_schemas(components, ErrorResponse, *STREAM_CHUNKS.values())
    for request in ("CompletionRequest", "ChatRequest"):
        properties = components[request]["properties"]
        properties["model"]["anyOf"] = [{"enum": list(app.state.served.targets)}, {"type": "null"}]
        for name, neutral in UNHONOURED.items():
            properties[name]["enum"] = list(neutral)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status, description in error_statuses(path, method).items():
                responses[status] = {"description": description, "content": error}
            if method == "post":
                responses["200"]["content"]["text/event-stream"] = {"schema": sse_event(STREAM_CHUNKS[path])}
                responses["200"]["description"] = (
                    "the completion (JSON); with stream: true, server-sent events: chunks (JSON), then [DONE]"
                )
            if path == "/metrics":
                responses["200"] = {
                    "description": "Prometheus' text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
    app.openapi_schema = schema
    return schema


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """The name in a Host header or an --allowed-hosts entry, without its port or an IPv6 address' brackets,
    lower-case: "LocalHost:8000" -> "localhost", "[::1]:8000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") > 1:  # an IPv6 address given without brackets (only in --allowed-hosts)
        return host
    return host.split(":", 1)[0]


class Guard:
    """ASGI middleware in front of every route: the Host header, the API key of /v1/ requests, then the body
    size (by its Content-Length, and by counting what arrives for a body sent in chunks).

    The Host header stops DNS rebinding: a page on an attacker's domain that resolves to 127.0.0.1 reaches a
    loopback server from the victim's browser, but its requests name the attacker's domain in Host. Refused
    with 400, as Starlette's TrustedHostMiddleware and Django's ALLOWED_HOSTS do (a request naming a host this
    server does not serve is a bad request; 421 is HTTP/2's answer to a reused connection, not this)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, allowed_hosts: set[str] | None = None):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None and host_name(headers.get("host", "")) not in self.allowed_hosts:
            return await send_error(
                send,
                400,
                f"the Host header {headers.get('host', '')!r} is not one this server answers to; "
                "allow it with --allowed-hosts",
            )
        if self.api_key is not None and scope.get("path", "").startswith("/v1/"):
            sent = headers.get("authorization", "")
            token = sent[7:] if sent[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await send_error(send, 401, "a valid API key is needed: send 'Authorization: Bearer <key>'")
        too_large = f"the request body is larger than {self.max_body_bytes} bytes (--max-body-bytes)"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await send_error(send, 413, too_large)
        received = 0
        started = refused = False

        async def counted_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_body_bytes and not started:
                    # answer now and tell the app the client is gone: it stops reading, its reply is dropped
                    refused = True
                    await send_error(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, tracked_send)


async def send_error(
    send, status: int, message: str, kind: str | None = None, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """An error response in OpenAI's shape, straight to an ASGI `send` (for code outside the app's handlers:
    the Guard, the replicas' router). `kind`: the error's type (by default from the status)."""
    if kind is None:
        kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error"}.get(
            status, "server_error"
        )
    body = json.dumps(error_body(status, message, kind)).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        start.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": start + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def internal_error(request: Request, exc: Exception):
    """A failure no handler expected: 500 in OpenAI's shape, naming the error's type only (never a stack trace
    or a file path); the trace goes to the server's log."""
    import traceback

    traceback.print_exception(exc)
    return error_response(500, f"internal server error ({type(exc).__name__})", "server_error")


async def invalid_request(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return error_response(400, f"the request body is not valid JSON: {reason}".strip())
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(400, f"invalid field {where or 'body'}: {first.get('msg', 'bad value')}", param=where or None)


async def http_error(request: Request, exc: StarletteHTTPException):
    """404, 405 and the other errors of routing, in OpenAI's shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))


# ---- endpoints ---------------------------------------------------------------------------------------
@router.get("/health", responses={200: {"model": Health}})
async def health(served: Served = Depends(served_state)):
    """200 while every target's engine runs (503 naming those that do not), with each one's batch."""
    for name, target in served.targets.items():
        engine = target.engine
        if not engine.healthy:
            return error_response(
                503, f"engine of {name!r} not running: {engine.error or 'not started'}", "server_error"
            )
    models = {
        name: {  # a prefilling request holds its row, as the running gauge counts it
            "running": len(t.engine.scheduler.running) + len(t.engine.scheduler.prefilling),
            "waiting": len(t.engine.scheduler.waiting),
        }
        for name, t in served.targets.items()
    }
    running = sum(m["running"] for m in models.values())
    return {"status": "ok", "running": running, "waiting": sum(m["waiting"] for m in models.values()), "models": models}


@router.get("/v1/models", responses={200: {"model": ModelList}})
async def models(served: Served = Depends(served_state)):
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "specgrove",
                "max_model_len": target.max_model_len,
            }
            for name, target in served.targets.items()
        ],
    }


@router.get("/metrics")
async def metrics(served: Served = Depends(served_state)):
    exposition = served.engines[0].metrics.exposition()  # one registry holds every target's, by model_name
    return Response(exposition, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/v1/completions", responses={200: {"model": Completion}})
async def completions(request: Request, body: CompletionRequest, served: Served = Depends(served_state)):
    return await handle(served, request, False, body)


@router.post("/v1/chat/completions", responses={200: {"model": ChatCompletion}})
async def chat_completions(request: Request, body: ChatRequest, served: Served = Depends(served_state)):
    return await handle(served, request, True, body)


async def handle(served: Served, request: Request, chat: bool, body: _Common):
    """One completion on the target `body.model` names: a bad request -> 400, a full queue -> 429, the engine
    loop down -> 503."""
    server = None
    try:
        server = served.pick(body.model)
        # off the event loop: tokenizing a long prompt must not stall other requests' streams or /health
        prompt_ids, params = await asyncio.to_thread(prepare, server, chat, body)
        return await run(server, request, chat, body, prompt_ids, params)
    except BadRequest as error:
        return error_response(400, str(error), param=error.param)
    except QueueFullError as error:
        return error_response(429, str(error), "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    except RuntimeError as error:
        if server is not None and not server.engine.healthy:
            return error_response(503, str(error), "server_error")
        raise


# ---- from a request body to the engine's input -------------------------------------------------------
def prepare(server: ServerState, chat: bool, body: _Common) -> tuple[list[int], SamplingParams]:
    """The prompt's token ids and the sampling parameters; BadRequest for what the engine cannot serve."""
    if chat:
        if body.max_completion_tokens is not None and body.max_tokens is not None and body.max_tokens <= 0:
            raise BadRequest(f"max_tokens must be >= 1, got {body.max_tokens}", "max_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prompt_ids = chat_prompt(server.tokenizer, body.messages)
    else:
        if body.echo:
            raise BadRequest("echo is not supported", "echo")
        # OpenAI's default for completions is 16, also when the field is sent as null
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_MAX_TOKENS
        prompt_ids = encode_prompt(server.tokenizer, body.prompt)
    params = sampling_params(server, body, max_tokens)
    fit_default_max_tokens(server, params, prompt_ids, explicit=max_tokens is not None)
    return prompt_ids, params


# field -> its neutral values (what a client sends when it does not use the field)
UNHONOURED = {
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


def refuse_unhonoured(body: _Common) -> None:
    for name, neutral in UNHONOURED.items():
        value = getattr(body, name)
        if not any(value == n and type(value) is type(n) for n in neutral):
            raise BadRequest(
                f"{name} is not supported by this server; leave it out (it would change what the response means)",
                name,
            )


def requested_logprobs(body: _Common) -> int | None:
    """How many top log-probabilities each token carries (0: the emitted token's alone); None: no logprobs."""
    if isinstance(body, ChatRequest):
        top = body.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
        if top and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if body.logprobs else None
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise BadRequest(f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {body.logprobs}", "logprobs")
    return body.logprobs


def sampling_params(server: ServerState, body: _Common, max_tokens: int | None) -> SamplingParams:
    refuse_unhonoured(body)
    logprobs = requested_logprobs(body)
    if not 1 <= body.n <= MAX_N:
        raise BadRequest(f"n must be in [1, {MAX_N}], got {body.n}", "n")
    if body.n > server.engine.capacity:
        raise BadRequest(
            f"n={body.n} is more than this server holds at once ({server.engine.capacity} sequences: "
            "--max-num-seqs + --max-waiting); ask for fewer choices",
            "n",
        )
    if max_tokens is None:
        max_tokens = server.max_model_len  # cut to the room left below
    if max_tokens <= 0:
        raise BadRequest(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    for stop in [body.stop] if isinstance(body.stop, str) else body.stop or []:
        check_text(stop, "stop")
    try:
        return SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            seed=body.seed,
            max_tokens=max_tokens,
            stop=body.stop,
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logprobs=logprobs,
            n=body.n,
        )
    except (ValueError, SpecgroveError) as error:
        raise BadRequest(str(error)) from None


def fit_default_max_tokens(server: ServerState, params: SamplingParams, prompt_ids: list[int], explicit: bool) -> None:
    if not explicit:
        room = server.max_model_len - len(prompt_ids) - server.engine.engine.num_speculative_tokens - 1
        if room < 1:
            raise BadRequest(
                f"the prompt ({len(prompt_ids)} tokens) leaves no room in the context "
                f"(max_model_len={server.max_model_len}); shorten it",
                "prompt",
            )
        params.max_tokens = params.max_new_tokens = min(params.max_tokens, room)


def check_text(text: str | None, param: str) -> None:
    """BadRequest for a string that is not Unicode text: a lone surrogate (JSON's "\\ud800" without its pair)
    cannot be encoded for the tokenizer."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRequest(
            f"{param} holds a lone surrogate ({text[error.start]!r} at character {error.start}), which is not "
            "text: send each character outside the Basic Multilingual Plane as a surrogate pair, or UTF-8",
            param,
        ) from None


def encode_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise BadRequest(
                "one prompt per request: send a string, a list of token ids, or a list of one string", "prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        if tokenizer is None:
            raise BadRequest("this model has no tokenizer; send the prompt as a list of token ids", "prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=False) or tokenizer.encode(prompt)
    else:
        ids = list(prompt)
    if not ids:
        raise BadRequest("the prompt is empty", "prompt")
    return ids


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> list[int]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model has no chat template; use /v1/completions", "messages")
    # "developer" is OpenAI's newer name for the system role; chat templates know only "system"
    plain = [
        {"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content) or ""}
        for m in messages
    ]
    for i, m in enumerate(plain):
        check_text(m["content"], f"messages.{i}.content")
    try:
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    except jinja2.TemplateSyntaxError:
        raise  # the model's template is broken: the server's fault, a 500
    except jinja2.TemplateError as error:
        # the template's raise_exception: this model refuses these messages (roles that do not alternate, a
        # system message it has no place for), which is the request's fault
        raise BadRequest(f"the model's chat template refuses these messages: {error}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def message_text(content: str | list[dict[str, Any]] | None) -> str | None:
    """A message's content as one string; OpenAI content parts must all be text."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequest("only text content parts are supported", "messages")
        texts.append(part["text"])
    return "".join(texts)


# ---- one request, start to finish --------------------------------------------------------------------
def submit(engine: AsyncEngine, prompt_ids: list[int], params: SamplingParams, request_id: str) -> list[RequestStream]:
    """The request's `params.n` choices, each its own sequence (`sampling.choice_params`: choice i seeded as the
    API seeds it; request ids `<id>-<index>` when n > 1)."""
    choices = choice_params(params)
    ids = [request_id] if len(choices) == 1 else [f"{request_id}-{i}" for i in range(len(choices))]
    try:
        return engine.submit_many(prompt_ids, choices, ids)
    except ValueError as error:
        raise BadRequest(str(error), "prompt") from None


async def run(
    server: ServerState, request: Request, chat: bool, body: _Common, prompt_ids: list[int], params: SamplingParams
):
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    streams = submit(server.engine, prompt_ids, params, request_id)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writers = [
            ChunkWriter(request_id, server.model_name, created, chat, include_usage, server.tokenizer, index)
            for index in range(len(streams))
        ]
        return StreamingResponse(sse(server, request, streams, writers), media_type="text/event-stream")
    seqs = await wait_for_finish(server.engine, request, streams)
    if seqs is None:  # client gone
        return Response(status_code=499)
    failed = next((seq for seq in seqs if seq.finish_reason == "error"), None)
    if failed is not None:
        return error_response(500, f"generation failed: {failed.error}", "server_error")
    return completion_body(server, request_id, created, chat, seqs)


def abort_all(engine: AsyncEngine, streams: list[RequestStream]) -> None:
    for stream in streams:
        if not stream.seq.finished:
            engine.abort(stream.request_id)


async def wait_for_finish(engine: AsyncEngine, request: Request, streams: list[RequestStream]) -> list[Sequence] | None:
    """The finished sequences (one per choice); None (after aborting them) when the client disconnected first."""
    finished: set[int] = set()
    try:
        while len(finished) < len(streams):
            delta = await next_delta(engine, request, streams)
            if delta is None:
                return None
            if delta.finished:
                finished.add(id(delta.seq))
        return [stream.seq for stream in streams]
    except asyncio.CancelledError:
        abort_all(engine, streams)
        raise


async def next_delta(engine: AsyncEngine, request: Request, streams: list[RequestStream]) -> Delta | None:
    """The next delta of any of the request's sequences (their streams share one queue); None (after aborting
    them) when the client disconnected."""
    while True:
        try:
            return await asyncio.wait_for(streams[0].queue.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                abort_all(engine, streams)
                return None


def completion_body(server: ServerState, request_id: str, created: int, chat: bool, seqs: list[Sequence]) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": server.model_name,
        "choices": [choice_body(server, chat, index, seq) for index, seq in enumerate(seqs)],
        "usage": usage_of(seqs),
    }


def choice_body(server: ServerState, chat: bool, index: int, seq: Sequence) -> dict:
    text = final_text(server.tokenizer, seq)
    logprobs = None if seq.logprobs is None else logprobs_json(server.tokenizer, seq.logprobs, chat)[0]
    if chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason(seq),
            "logprobs": logprobs,
        }
    return {
        "index": index,
        "text": text,
        "finish_reason": finish_reason(seq),
        "logprobs": logprobs,
        "stop_reason": seq.stop_reason,
    }


def token_text(tokenizer, token_id: int) -> str:
    """One token as text (vLLM's "token_id:N" where there is no tokenizer)."""
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def logprobs_json(tokenizer, entries: list[TokenLogprob], chat: bool, text_offset: int = 0) -> tuple[dict, int]:
    """OpenAI's logprobs object for `entries` (the target's raw log-probabilities, `TokenLogprob`) and the text
    offset after them. Chat: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}; completions: {tokens,
    token_logprobs, top_logprobs (the top tokens and the emitted one, as OpenAI's), text_offset}."""
    if chat:

        def item(token_id: int, logprob: float) -> dict:
            text = token_text(tokenizer, token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content}, text_offset
    tokens, offsets = [], []
    for e in entries:
        tokens.append(token_text(tokenizer, e.token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    tops = [{**{token_text(tokenizer, t): lp for t, lp in e.top}, tokens[i]: e.logprob} for i, e in enumerate(entries)]
    body = {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops}
    return {**body, "text_offset": offsets}, text_offset


def final_text(tokenizer, seq: Sequence) -> str:
    if seq.params.stop and seq.stop_reason in seq.params.stop:
        return seq.text
    return tokenizer.decode(seq.output_ids, skip_special_tokens=True) if tokenizer is not None else ""


def finish_reason(seq: Sequence) -> str:
    """OpenAI's finish reason: "length" at max_tokens, "stop" otherwise."""
    return "length" if seq.finish_reason == "length" else "stop"


# ---- server-sent events ------------------------------------------------------------------------------
DONE = "data: [DONE]\n\n"


def event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


@dataclass
class ChunkWriter:
    """The events of one streamed response: OpenAI's text_completion or chat.completion.chunk objects."""

    request_id: str
    model_name: str
    created: int
    chat: bool
    include_usage: bool
    tokenizer: object = None
    index: int = 0  # the choice's
    logprobs_sent: int = 0  # entries of seq.logprobs sent so far
    text_offset: int = 0

    def chunk(self, text: str | None, finish: str | None, first: bool = False, seq: Sequence | None = None) -> str:
        """A chunk with `text`; with `seq` (when it records logprobs), the logprobs of its tokens not sent yet."""
        logprobs = None
        if seq is not None and seq.logprobs is not None and not first:
            entries = seq.logprobs[self.logprobs_sent :]
            self.logprobs_sent += len(entries)
            logprobs, self.text_offset = logprobs_json(self.tokenizer, entries, self.chat, self.text_offset)
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": self.index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": self.index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return self._event([choice], {"usage": None} if self.include_usage else {})

    def usage(self, seqs: list[Sequence]) -> str:
        """The final chunk of `stream_options.include_usage`: no choices, the request's usage."""
        return self._event([], {"usage": usage_of(seqs)})

    def _event(self, choices: list[dict], extra: dict) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return event(
            {
                "id": self.request_id,
                "object": obj,
                "created": self.created,
                "model": self.model_name,
                "choices": choices,
                **extra,
            }
        )


async def sse(server: ServerState, request: Request, streams: list[RequestStream], writers: list[ChunkWriter]):
    """Server-sent events: a chunk per step and choice with the new text (`settled_text`), tagged with the
    choice's index (in chat, each choice's role chunk just before its first text); the request's sequences are
    aborted if the stream ends before they finished (the client went away)."""
    seqs = [stream.seq for stream in streams]
    index_of = {id(seq): i for i, seq in enumerate(seqs)}
    hold = max((len(s) for s in seqs[0].params.stop), default=1) - 1
    sent = [""] * len(seqs)
    finished: set[int] = set()
    greeted: set[int] = set()  # chat choices whose first chunk (the role) is out
    try:
        while True:
            delta = await next_delta(server.engine, request, streams)
            if delta is None:
                return
            if delta.finished and delta.finish_reason == "error":
                yield event(error_body(500, f"generation failed: {delta.error}", "server_error"))
                yield DONE
                return
            i = index_of[id(delta.seq)]
            seq = seqs[i]
            text = settled_text(server.tokenizer, seq, hold, delta.finished)
            if text is None:
                continue
            new, sent[i] = unsent(text, sent[i])
            finish = finish_reason(seq) if delta.finished else None
            if new or finish:
                if writers[i].chat and i not in greeted:
                    # the role goes with the choice's first text, not before it: a stream whose replica died
                    # before it generated anything has sent nothing, so the router can send it elsewhere
                    greeted.add(i)
                    yield writers[i].chunk("", None, first=True)
                yield writers[i].chunk(new, finish, seq=seq)
            if delta.finished:
                finished.add(i)
            if len(finished) == len(seqs):
                if writers[0].include_usage:
                    yield writers[0].usage(seqs)
                yield DONE
                return
    finally:
        abort_all(server.engine, streams)


def settled_text(tokenizer, seq: Sequence, hold: int, finished: bool) -> str | None:
    """The text that is certain so far: all of it once finished; before that, the text before the first stop
    string in it (the engine may have run past this delta), without the last `hold` characters (they could
    still become part of a stop string) and without an incomplete UTF-8 character. So whatever is sent is a
    prefix of the final text. None while unfinished when there is no tokenizer."""
    if finished:
        return final_text(tokenizer, seq)
    if tokenizer is None:
        return None
    text = tokenizer.decode(list(seq.output_ids), skip_special_tokens=True)
    stop = first_stop(text, seq.params.stop)  # where the engine cuts the final text
    if stop is not None:
        text = text[: stop[0]]
    text = text[: max(0, len(text) - hold)]
    while text.endswith("\ufffd"):
        text = text[:-1]
    return text


def unsent(text: str, sent: str) -> tuple[str, str]:
    """(the part of `text` not sent yet, all that is sent after it); nothing new unless text extends `sent`."""
    if len(text) > len(sent) and text.startswith(sent):
        return text[len(sent) :], text
    return "", sent
