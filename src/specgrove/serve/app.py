"""An OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream over SSE with `stream: true`;
`stream_options.include_usage` adds a final usage chunk), GET /v1/models, GET /health, GET /metrics
(Prometheus). Usage carries this request's speculation statistics under "speculation". `n` choices are n
sequences (`submit`); `logprobs` / `top_logprobs` are the target's raw log-probabilities (`logprobs_json`).

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: malformed JSON, wrong field
types, out-of-range values, a prompt too long for the context -> 400; a full queue -> 429; a failure
inside generation -> 500 for that request only; the engine loop down -> 503.

The endpoints are module-level functions on `router`; `build_app` keeps what they share (the engine
and the served model's name, `ServerState`) on `app.state.server`, and they get it through `Depends`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from specgrove.engine.scheduler import QueueFullError
from specgrove.engine.sequence import Sequence, TokenLogprob
from specgrove.errors import SpecgroveError
from specgrove.sampling import SamplingParams
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


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat = 1.0
    top_p: StrictFloat = 1.0
    top_k: StrictInt = 0
    min_p: StrictFloat = 0.0
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    ignore_eos: StrictBool = False
    presence_penalty: StrictFloat = 0.0
    frequency_penalty: StrictFloat = 0.0
    repetition_penalty: StrictFloat = 1.0  # vLLM's extension
    user: str | None = None
    # Fields that change what a response means. The server does not honour them yet, so a request that sets
    # one (to anything but its neutral value) is refused rather than answered as if it had not.
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    suffix: Any = None
    best_of: Any = None


class CompletionRequest(_Common):
    prompt: str | list[StrictInt] | list[str]
    max_tokens: StrictInt | None = COMPLETION_MAX_TOKENS
    echo: StrictBool = False
    logprobs: StrictInt | None = None  # 0..5: the emitted token's and the most likely tokens' log-probabilities


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None  # 0..20, with logprobs: true


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
    """What every handler needs; build_app keeps it on `app.state.server`."""

    engine: AsyncEngine
    model_name: str

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len


def server_state(request: Request) -> ServerState:
    return request.app.state.server


router = APIRouter()


# ---- the app -----------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    engine = app.state.server.engine
    engine.start()
    yield
    engine.stop()


def build_app(
    engine: AsyncEngine, model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The app. `api_key`: every /v1/ request must send `Authorization: Bearer <api_key>` (else 401); /health
    and /metrics stay open, as vLLM's. `max_body_bytes`: larger request bodies get 413 before they are read."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    app = FastAPI(title="specgrove", version="0.1.0", lifespan=lifespan)
    app.state.server = ServerState(engine, model_name)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(router)
    app.add_middleware(Guard, api_key=api_key or None, max_body_bytes=max_body_bytes)
    app.openapi = lambda: openapi_schema(app)
    return app


ERROR_STATUSES = {
    "400": "a malformed or unservable request",
    "401": "a missing or wrong API key (with --api-key)",
    "413": "a body over --max-body-bytes",
    "429": "the queue is full; retry after Retry-After seconds",
    "500": "this request failed inside generation",
    "503": "the engine is not running",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema with the errors this server really sends: 400 (not FastAPI's 422, which it never
    sends) and the others of ERROR_STATUSES on the POST endpoints, all in OpenAI's error shape."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components.update(
        {
            name: model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, model in (("ErrorDetail", ErrorDetail), ("ErrorResponse", ErrorResponse))
        }
    )
    components["ErrorResponse"].pop("$defs", None)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in schema.get("paths", {}).values():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if method == "post":
                for status, description in ERROR_STATUSES.items():
                    responses[status] = {"description": description, "content": error}
    app.openapi_schema = schema
    return schema


class Guard:
    """ASGI middleware in front of every route: the API key of /v1/ requests, then the body size (by its
    Content-Length, and by counting what arrives for a body sent in chunks)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path", "").startswith("/v1/"):
            sent = headers.get("authorization", "")
            token = sent[7:] if sent[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await _send_error(send, 401, "a valid API key is needed: send 'Authorization: Bearer <key>'")
        too_large = f"the request body is larger than {self.max_body_bytes} bytes (--max-body-bytes)"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _send_error(send, 413, too_large)
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
                    await _send_error(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, tracked_send)


async def _send_error(send, status: int, message: str) -> None:
    kind = {401: "authentication_error", 413: "invalid_request_error"}.get(status, "server_error")
    body = json.dumps(error_body(status, message, kind)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
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
@router.get("/health")
async def health(server: ServerState = Depends(server_state)):
    engine = server.engine
    if not engine.healthy:
        return error_response(503, f"engine not running: {engine.error or 'not started'}", "server_error")
    return {"status": "ok", "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}


@router.get("/v1/models")
async def models(server: ServerState = Depends(server_state)):
    return {
        "object": "list",
        "data": [
            {
                "id": server.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "specgrove",
                "max_model_len": server.max_model_len,
            }
        ],
    }


@router.get("/metrics")
async def metrics(server: ServerState = Depends(server_state)):
    return Response(server.engine.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest, server: ServerState = Depends(server_state)):
    return await handle(server, request, False, body)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatRequest, server: ServerState = Depends(server_state)):
    return await handle(server, request, True, body)


async def handle(server: ServerState, request: Request, chat: bool, body: _Common):
    """One completion: a bad request -> 400, a full queue -> 429, the engine loop down -> 503."""
    try:
        # off the event loop: tokenizing a long prompt must not stall other requests' streams or /health
        prompt_ids, params = await asyncio.to_thread(prepare, server, chat, body)
        return await run(server, request, chat, body, prompt_ids, params)
    except BadRequest as error:
        return error_response(400, str(error), param=error.param)
    except QueueFullError as error:
        return error_response(429, str(error), "rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    except RuntimeError as error:
        if not server.engine.healthy:
            return error_response(503, str(error), "server_error")
        raise


# ---- from a request body to the engine's input -------------------------------------------------------
def prepare(server: ServerState, chat: bool, body: _Common) -> tuple[list[int], SamplingParams]:
    """The prompt's token ids and the sampling parameters; BadRequest for what the engine cannot serve."""
    if chat:
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


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bounds: completions' logprobs, chat's top_logprobs
MAX_TOP_LOGPROBS = 20


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


MAX_N = 16  # choices per request


def sampling_params(server: ServerState, body: _Common, max_tokens: int | None) -> SamplingParams:
    refuse_unhonoured(body)
    logprobs = requested_logprobs(body)
    if body.model is not None and body.model != server.model_name:
        raise BadRequest(f"model {body.model!r} is not served here; this server serves {server.model_name!r}", "model")
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
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
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
def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded with `seed`: choice 0 keeps it (so n = 1 answers as it
    always did), the others get one derived from it (SHA-256 of "seed/index"), all reproducible."""
    if seed is None or index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "big") - 2**63


def submit(
    engine: AsyncEngine, prompt_ids: list[int], params: SamplingParams, request_id: str, n: int = 1
) -> list[RequestStream]:
    """The request's n choices, each its own sequence (request ids `<id>-<index>` when n > 1)."""
    choices = [params] if n == 1 else [dataclasses.replace(params, seed=choice_seed(params.seed, i)) for i in range(n)]
    ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
    try:
        return engine.submit_many(prompt_ids, choices, ids)
    except ValueError as error:
        raise BadRequest(str(error), "prompt") from None


async def run(
    server: ServerState, request: Request, chat: bool, body: _Common, prompt_ids: list[int], params: SamplingParams
):
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    streams = submit(server.engine, prompt_ids, params, request_id, body.n)
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
    choice's index; the request's sequences are aborted if the stream ends before they finished (the client
    went away)."""
    seqs = [stream.seq for stream in streams]
    index_of = {id(seq): i for i, seq in enumerate(seqs)}
    hold = max((len(s) for s in seqs[0].params.stop), default=1) - 1
    sent = [""] * len(seqs)
    finished: set[int] = set()
    try:
        if writers[0].chat:
            for writer in writers:
                yield writer.chunk("", None, first=True)
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
    for stop in seq.params.stop:
        index = text.find(stop)
        if index >= 0:
            text = text[:index]
    text = text[: max(0, len(text) - hold)]
    while text.endswith("\ufffd"):
        text = text[:-1]
    return text


def unsent(text: str, sent: str) -> tuple[str, str]:
    """(the part of `text` not sent yet, all that is sent after it); nothing new unless text extends `sent`."""
    if len(text) > len(sent) and text.startswith(sent):
        return text[len(sent) :], text
    return "", sent
