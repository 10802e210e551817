"""The simulated engine's OpenAI-compatible HTTP surface, shaped like vLLM 0.32's.

Prompt lengths: a text prompt counts one token per 4 characters, rounded up (the usual rule of thumb
for English BPE tokenizers); a prompt of token ids counts its ids; a chat counts the characters of
its messages rendered as `<|role|>\\ncontent\\n` per message plus `<|assistant|>\\n`. The simulated
model never emits EOS, so every request produces exactly max_tokens tokens (vLLM's default when
absent: max_model_len - prompt) and finishes with reason "length"; `ignore_eos` changes nothing.
As in vLLM, unknown request fields are ignored; bad values get vLLM's 400 error body.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controlplane import names
from controlplane.engines.sim_engine import Finished, LiveEngine, LiveRequest, RequestInfo, Timing
from controlplane.engines.sim_metrics import SimTelemetry

CHARS_PER_TOKEN = 4
_WORDS = ("the", "replica", "token", "queue", "batch", "cache", "engine", "stream", "model", "fleet", "latency",
          "budget", "prefill", "decode", "window", "serve")


# --- request bodies ---------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as vLLM: other OpenAI fields are accepted and ignored
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1, description="one sequence per request: n > 1 is not simulated")

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, int) for x in v)):
            if not v:
                raise ValueError("the prompt is empty; it needs at least one character or token id")
            return v
        raise ValueError("must be one string or one list of token ids (batched prompts are not simulated)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def prompt_tokens(body: CompletionRequest | ChatRequest) -> int:
    if isinstance(body, ChatRequest):
        text = "".join(f"<|{m.role}|>\n{m.text()}\n" for m in body.messages) + "<|assistant|>\n"
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    if isinstance(body.prompt, list):
        return len(body.prompt)
    return math.ceil(len(body.prompt) / CHARS_PER_TOKEN)


# --- vLLM's error bodies ------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.param = status, kind, message, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    parts, first_loc = [], None
    for err in exc.errors()[:3]:
        if err.get("type") == "json_invalid":
            return ApiError(400, "BadRequestError", f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}"
                            f" at character {err.get('loc', ('', '?'))[-1]}")
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first_loc = first_loc or loc or None
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return ApiError(400, "BadRequestError", "; ".join(parts), first_loc)


# --- responses --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedModel:
    served_name: str
    root: str  # the catalog model behind it
    accelerator: str

    @property
    def fingerprint(self) -> str:
        return f"{names.SIM_FINGERPRINT_PREFIX}{self.root}@{self.accelerator}"


def token_text(start: int, count: int) -> str:
    return "".join(" " + _WORDS[i % len(_WORDS)] for i in range(start, start + count))


def _usage(req: LiveRequest, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": req.prompt_tokens, "total_tokens": req.prompt_tokens + completion,
            "completion_tokens": completion, "prompt_tokens_details": None}


Kind = Literal["completion", "chat"]


class _Stream:
    """Server-sent events for one request: vLLM's chunk shapes, tokens coalesced per `interval`."""

    def __init__(self, kind: Kind, req: LiveRequest, served: ServedModel, include_usage: bool,
                 interval: int) -> None:
        self.kind, self.req, self.served, self.include_usage, self.interval = kind, req, served, include_usage, interval
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(16)
        self.created = int(time.time())

    def _chunk(self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.served.served_name,
            "system_fingerprint": self.served.fingerprint, "choices": [choice] if choice else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _tokens(self, start: int, count: int, finish: str | None, role: bool) -> str:
        text = token_text(start, count)
        if self.kind == "chat":
            # vLLM opens a chat stream with the role (empty content) when the first token is out, then the token.
            head = self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}) if role else ""
            return head + self._chunk({"index": 0, "delta": {"content": text}, "logprobs": None,
                                       "finish_reason": finish})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                            "stop_reason": None})

    async def events(self) -> AsyncIterator[str]:
        req, sent, held = self.req, 0, 0
        try:
            while True:
                ev = await req.events.get()
                if isinstance(ev, Finished):
                    break
                held += ev.count
                done = sent + held >= req.max_tokens
                if sent == 0 or held >= self.interval or done:
                    yield self._tokens(sent, held, "length" if done else None, role=sent == 0)
                    sent, held = sent + held, 0
            if self.include_usage:
                yield self._chunk(None, _usage(req, sent))
            yield "data: [DONE]\n\n"
        finally:
            if req.emitted < req.max_tokens:
                req.aborted = True  # the client went away (or the server is stopping) before the end


async def _finish(req: LiveRequest) -> Timing:
    try:
        while True:
            ev = await req.events.get()
            if isinstance(ev, Finished):
                return ev.timing
    finally:
        if req.emitted < req.max_tokens:
            req.aborted = True


def _complete(kind: Kind, req: LiveRequest, served: ServedModel, timing: Timing) -> dict[str, Any]:
    text = token_text(0, timing.completion_tokens)
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                                  "logprobs": None, "finish_reason": "length", "stop_reason": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                  "prompt_logprobs": None}
    return {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(16),
            "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
            "model": served.served_name, "system_fingerprint": served.fingerprint, "choices": [choice],
            "usage": _usage(req, timing.completion_tokens)}


# --- the app --------------------------------------------------------------------------------------
def build_app(engine: LiveEngine, telemetry: SimTelemetry, served: ServedModel, *, stream_interval: int = 1) -> FastAPI:
    """The HTTP app around a live engine; its lifespan runs the engine's loop and flushes spans at the end."""
    max_len = engine.replica.max_model_len
    loop_tasks: list[asyncio.Task[None]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(engine.run(), name="sim-engine-loop")
        loop_tasks.append(task)
        try:
            yield
        finally:
            task.cancel()
            telemetry.shutdown()

    app = FastAPI(title="simulated vLLM engine", lifespan=lifespan)
    app.state.engine, app.state.telemetry = engine, telemetry

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def serve(kind: Kind, body: CompletionRequest | ChatRequest, request: Request) -> Response:
        if body.model is not None and body.model != served.served_name:
            raise ApiError(404, "NotFoundError", f"The model `{body.model}` does not exist.", "model")
        prompt = prompt_tokens(body)
        asked = body.max_completion_tokens if isinstance(body, ChatRequest) and body.max_completion_tokens \
            else body.max_tokens
        if prompt >= max_len or (asked is not None and prompt + asked > max_len):
            raise ApiError(400, "BadRequestError",
                           f"This model's maximum context length is {max_len} tokens. However, you requested "
                           f"{prompt + (asked or 0)} tokens ({prompt} in the messages, {asked or 0} in the "
                           "completion). Please reduce the length of the messages or completion.",
                           "max_tokens" if asked else "prompt")
        headers = {k: v for k in ("traceparent", "tracestate") if (v := request.headers.get(k))}
        info = RequestInfo(request_id=request.headers.get("x-request-id") or f"cmpl-{secrets.token_hex(16)}",
                           max_tokens_param=asked, temperature=body.temperature, top_p=body.top_p, n=body.n,
                           trace_headers=headers)
        req = engine.submit(info, prompt, asked if asked is not None else max_len - prompt)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            stream = _Stream(kind, req, served, include, stream_interval)
            return StreamingResponse(stream.events(), media_type="text/event-stream")
        timing = await _finish(req)
        return JSONResponse(_complete(kind, req, served, timing))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serve("completion", body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await serve("chat", body, request)

    @app.get("/health")
    async def health() -> Response:
        task = loop_tasks[-1] if loop_tasks else None
        if task is not None and task.done():  # the step loop died: say so, as a dead vLLM engine would
            why = repr(task.exception()) if not task.cancelled() else "cancelled"
            return ApiError(503, "EngineDeadError", f"the simulated engine's step loop stopped: {why}").response()
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": served.served_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": served.root, "parent": None, "max_model_len": max_len, "permission": [],
            "simulated": True, "accelerator": served.accelerator}]}

    @app.get("/metrics")
    async def metrics() -> Response:  # async: renders in the engine's thread, so the gauges read a settled state
        return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)

    return app

