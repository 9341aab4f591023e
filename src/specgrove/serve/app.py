"""An OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream over SSE with `stream: true`;
`stream_options.include_usage` adds a final usage chunk), GET /v1/models, GET /health, GET /metrics
(Prometheus). Usage carries this request's speculation statistics under "speculation".

Errors are OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: malformed JSON, wrong field
types, out-of-range values, a prompt too long for the context -> 400; a full queue -> 429; a failure
inside generation -> 500 for that request only; the engine loop down -> 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from specgrove.engine.scheduler import QueueFullError
from specgrove.errors import SpecgroveError
from specgrove.sampling import SamplingParams
from specgrove.serve.async_engine import AsyncEngine, Delta, RequestStream, usage_of

DISCONNECT_POLL_S = 0.5


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
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[StrictInt] | list[str]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    echo: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


# ---- the app -----------------------------------------------------------------------------------------
def build_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="specgrove", version="0.1.0", lifespan=lifespan)
    tokenizer = engine.engine.tokenizer

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"invalid field {where or 'body'}: {first.get('msg', 'bad value')}", param=where or None)

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return error_response(503, f"engine not running: {engine.error or 'not started'}", "server_error")
        return {"status": "ok", "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "specgrove",
                                            "max_model_len": engine.engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def sampling_params(body: _Common, max_tokens: int | None) -> SamplingParams:
        if body.model is not None and body.model != model_name:
            raise BadRequest(f"model {body.model!r} is not served here; this server serves {model_name!r}", "model")
        if body.n != 1:
            raise BadRequest(f"n={body.n} is not supported; send one request per completion", "n")
        if max_tokens is None:
            max_tokens = engine.engine.max_model_len  # cut to the room left below
        if max_tokens <= 0:
            raise BadRequest(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        try:
            return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                                  seed=body.seed, max_tokens=max_tokens, stop=body.stop, ignore_eos=body.ignore_eos,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
        except (ValueError, SpecgroveError) as error:
            raise BadRequest(str(error)) from None

    def fit_default_max_tokens(params: SamplingParams, prompt_ids: list[int], explicit: bool) -> None:
        if not explicit:
            room = engine.engine.max_model_len - len(prompt_ids) - engine.engine.num_speculative_tokens - 1
            if room < 1:
                raise BadRequest(f"the prompt ({len(prompt_ids)} tokens) leaves no room in the context "
                                 f"(max_model_len={engine.engine.max_model_len}); shorten it", "prompt")
            params.max_tokens = params.max_new_tokens = min(params.max_tokens, room)

    def encode_prompt(prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise BadRequest("one prompt per request: send a string, a list of token ids, or a list of one string",
                                 "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if tokenizer is None:
                raise BadRequest("this model has no tokenizer; send the prompt as a list of token ids", "prompt")
            ids = tokenizer.encode(prompt, add_special_tokens=False) or tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        return ids

    def chat_prompt(messages: list[ChatMessage]) -> list[int]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise BadRequest("this model has no chat template; use /v1/completions", "messages")
        plain = []
        for m in messages:
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: text only
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise BadRequest("only text content parts are supported", "messages")
                    texts.append(part["text"])
                content = "".join(texts)
            plain.append({"role": m.role, "content": content or ""})
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)

    def submit(prompt_ids: list[int], params: SamplingParams, request_id: str) -> RequestStream:
        try:
            return engine.submit(prompt_ids, params, request_id)
        except ValueError as error:
            raise BadRequest(str(error), "prompt") from None

    async def run(request: Request, chat: bool, body: _Common, prompt_ids: list[int], params: SamplingParams):
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        stream = submit(prompt_ids, params, request_id)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(request, stream, chat, created, include_usage), media_type="text/event-stream")
        seq = None
        try:
            while True:
                delta = await next_delta(request, stream)
                if delta is None:  # client gone
                    return Response(status_code=499)
                if delta.finished:
                    seq = delta.seq
                    break
        except asyncio.CancelledError:
            engine.abort(request_id)
            raise
        if seq.finish_reason == "error":
            return error_response(500, f"generation failed: {seq.error}", "server_error")
        text = final_text(seq)
        finish = "length" if seq.finish_reason == "length" else "stop"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None,
                      "stop_reason": seq.stop_reason}
            obj = "text_completion"
        return {"id": request_id, "object": obj, "created": created, "model": model_name, "choices": [choice],
                "usage": usage_of(seq)}

    async def next_delta(request: Request, stream: RequestStream) -> Delta | None:
        """The next delta; None (after aborting the request) when the client disconnected."""
        while True:
            try:
                return await asyncio.wait_for(stream.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.abort(stream.request_id)
                    return None

    def final_text(seq) -> str:
        if seq.params.stop and seq.stop_reason in seq.params.stop:
            return seq.text
        return tokenizer.decode(seq.output_ids, skip_special_tokens=True) if tokenizer is not None else ""

    async def sse(request: Request, stream: RequestStream, chat: bool, created: int, include_usage: bool):
        """Server-sent events: a chunk per step with the new text. Text that could still become part of a
        stop string, or an incomplete UTF-8 character, is held back until it is certain."""
        seq = stream.seq
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        sent = ""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": stream.request_id, "object": obj, "created": created, "model": model_name, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield chunk("", None, first=True)
            while True:
                delta = await next_delta(request, stream)
                if delta is None:
                    return
                if delta.finished and delta.finish_reason == "error":
                    error = {"error": {"message": f"generation failed: {delta.error}", "type": "server_error",
                                       "param": None, "code": 500}}
                    yield f"data: {json.dumps(error)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if delta.finished:
                    text = final_text(seq)
                else:
                    if tokenizer is None:
                        continue
                    text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
                    text = text[: len(text) - hold] if hold else text
                    while text.endswith("\ufffd"):
                        text = text[:-1]
                if len(text) > len(sent) and text.startswith(sent):
                    new, sent = text[len(sent):], text
                else:
                    new = ""
                finish = None
                if delta.finished:
                    finish = "length" if seq.finish_reason == "length" else "stop"
                if new or finish:
                    yield chunk(new, finish)
                if delta.finished:
                    if include_usage:
                        data = {"id": stream.request_id, "object": obj, "created": created, "model": model_name,
                                "choices": [], "usage": usage_of(seq)}
                        yield f"data: {json.dumps(data)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not seq.finished:
                engine.abort(stream.request_id)

    async def handle(request: Request, chat: bool, body: _Common):
        try:
            if chat:
                max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
                prompt_ids = chat_prompt(body.messages)
            else:
                if body.echo:
                    raise BadRequest("echo is not supported", "echo")
                max_tokens = body.max_tokens
                prompt_ids = encode_prompt(body.prompt)
            params = sampling_params(body, max_tokens)
            fit_default_max_tokens(params, prompt_ids, explicit=max_tokens is not None)
            return await run(request, chat, body, prompt_ids, params)
        except BadRequest as error:
            return error_response(400, str(error), param=error.param)
        except QueueFullError as error:
            return error_response(429, str(error), "rate_limit_error")
        except RuntimeError as error:
            if not engine.healthy:
                return error_response(503, str(error), "server_error")
            raise

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await handle(request, False, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await handle(request, True, body)

    return app
