"""The simulated engine's OpenAI-compatible HTTP surface, shaped like vLLM 0.32's.

Prompt lengths: a text prompt counts one token per 4 characters, rounded up (the usual rule of thumb
for English BPE tokenizers); a prompt of token ids counts its ids; a chat counts the characters of
its messages rendered as `<|role|>\\ncontent\\n` per message plus `<|assistant|>\\n`. The simulated
model never emits EOS, so a request produces max_tokens tokens (vLLM's default when absent:
max_model_len - prompt) and finishes with reason "length"; `ignore_eos` changes nothing. Its text is a
fixed cycle of words: a `stop` string found in it ends the request at the token that completes it,
with reason "stop" and the text cut before it, as vLLM does. A client that goes away, streaming or not,
has its request counted as aborted. As in vLLM, unknown request fields are ignored; bad values get
vLLM's 400 error body.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from controlplane.tuning import catalog

CHARS_PER_TOKEN = 4
_WORDS = ("the", "replica", "token", "queue", "batch", "cache", "engine", "stream", "model", "fleet", "latency",
          "budget", "prefill", "decode", "window", "serve")


# --- request bodies ---------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Sampling(BaseModel):
    # As vLLM: other OpenAI fields are accepted and ignored; no number may be infinite or NaN.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1, description="one sequence per request: n > 1 is not simulated")
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and any(not x for x in ([v] if isinstance(v, str) else v)):
            raise ValueError("a stop string must not be empty")
        return v

    def stop_strings(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

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
        # type() rather than isinstance: true and false are ints to Python, not token ids.
        if isinstance(v, str) or (isinstance(v, list) and all(type(x) is int for x in v)):
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
            return "".join(str(t) for part in self.content if (t := part.get("text")) is not None)
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


@dataclass(frozen=True)
class Plan:
    """How a request ends: after `max_tokens` tokens, its text cut to `text_chars` characters when a stop
    string (`stop`) ends it (None: it runs to max_tokens and keeps all of its text)."""

    max_tokens: int
    text_chars: int | None = None
    stop: str | None = None

    @property
    def finish_reason(self) -> str:
        return "length" if self.stop is None else "stop"

    @classmethod
    def of(cls, max_tokens: int, stop: list[str]) -> Plan:
        """Where the output stops: as vLLM checks the text after each token, the stop string that *completes*
        first wins (the first listed on a tie), and the text is cut where it starts. The text repeats every
        len(_WORDS) tokens, so a match, if any, starts in the first cycle: only that much text is searched."""
        if not stop:
            return cls(max_tokens)
        window = min(max_tokens, len(_WORDS) + max(len(x) for x in stop) + 1)
        text = token_text(0, window)
        hits = [(i + len(x), k, i) for k, x in enumerate(stop) if (i := text.find(x)) >= 0]
        if not hits:
            return cls(max_tokens)
        end, which, at = min(hits)  # the earliest occurrence of a string is also the one that completes first
        tokens, chars = 0, 0
        while chars < end:  # the token whose text completes the match is the last one
            chars += len(token_text(tokens, 1))
            tokens += 1
        return cls(tokens, at, stop[which])

    def cut(self, text: str, offset: int) -> str:
        """The part of `text` (starting `offset` characters into the output) the client sees."""
        return text if self.text_chars is None else text[:max(0, self.text_chars - offset)]


def _usage(req: LiveRequest, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": req.prompt_tokens, "total_tokens": req.prompt_tokens + completion,
            "completion_tokens": completion, "prompt_tokens_details": None}


Kind = Literal["completion", "chat"]


class _Stream:
    """Server-sent events for one request: vLLM's chunk shapes, tokens coalesced per `interval`; with
    `continuous_usage`, every chunk carries the usage so far (vLLM's continuous_usage_stats)."""

    def __init__(self, kind: Kind, req: LiveRequest, served: ServedModel, plan: Plan, include_usage: bool,
                 continuous_usage: bool, interval: int) -> None:
        self.kind, self.req, self.served, self.plan, self.interval = kind, req, served, plan, interval
        self.include_usage, self.continuous_usage = include_usage, include_usage and continuous_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(16)
        self.created = int(time.time())
        self.chars = 0  # characters of the output's text produced so far (before any stop cut)
        self.sent = 0  # output tokens sent so far (the usage of a continuous-usage chunk)

    def _chunk(self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created, "model": self.served.served_name,
            "system_fingerprint": self.served.fingerprint, "choices": [choice] if choice else []}
        if usage is not None:
            body["usage"] = usage
        elif self.continuous_usage:
            body["usage"] = _usage(self.req, self.sent)
        return f"data: {json.dumps(body)}\n\n"

    def _tokens(self, start: int, count: int, finish: str | None, role: bool) -> str:
        full = token_text(start, count)
        text = self.plan.cut(full, self.chars)
        self.chars += len(full)
        self.sent = start + count
        stop_reason = self.plan.stop if finish == "stop" else None
        if self.kind == "chat":
            # vLLM opens a chat stream with the role (empty content) when the first token is out, then the token.
            head = self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}, _usage(self.req, 0) if self.continuous_usage else None) \
                if role else ""
            return head + self._chunk({"index": 0, "delta": {"content": text}, "logprobs": None,
                                       "finish_reason": finish})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                            "stop_reason": stop_reason})

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
                    yield self._tokens(sent, held, self.plan.finish_reason if done else None, role=sent == 0)
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


async def _until_disconnect(request: Request) -> None:
    """Return when the client goes away (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finish_unless_gone(req: LiveRequest, request: Request) -> Timing | None:
    """The request's timing, or None when its client went away first (its request is then aborted), as
    vLLM's `with_cancellation` does for a non-streaming answer."""
    finish = asyncio.ensure_future(_finish(req))
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((finish, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        finished = finish.done()
        if not finished:  # the client left, or this handler was cancelled: _finish marks it aborted
            finish.cancel()
    if finished:  # finished first (or at the same time): the answer goes out
        return finish.result()
    with contextlib.suppress(asyncio.CancelledError):
        await finish  # let it mark the request aborted
    task = asyncio.current_task()
    if task is not None and task.cancelling():  # this handler's own cancellation is not swallowed
        raise asyncio.CancelledError
    return None


def _complete(kind: Kind, req: LiveRequest, served: ServedModel, plan: Plan, timing: Timing) -> dict[str, Any]:
    text = plan.cut(token_text(0, timing.completion_tokens), 0)
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                                  "logprobs": None, "finish_reason": plan.finish_reason, "stop_reason": plan.stop}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": plan.finish_reason,
                  "stop_reason": plan.stop, "prompt_logprobs": None}
    return {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(16),
            "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
            "model": served.served_name, "system_fingerprint": served.fingerprint, "choices": [choice],
            "usage": _usage(req, timing.completion_tokens)}


# --- the app --------------------------------------------------------------------------------------
def build_app(engine: LiveEngine, telemetry: SimTelemetry, served: ServedModel, *, stream_interval: int = 1) -> FastAPI:
    """The HTTP app around a live engine; its lifespan runs the engine's loop and flushes spans at the end."""
    max_len = engine.replica.max_model_len
    vocab = catalog.model(served.root).vocab
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
        if isinstance(body, CompletionRequest) and isinstance(body.prompt, list):
            bad = [x for x in body.prompt if not 0 <= x < vocab]
            if bad:
                raise ApiError(400, "BadRequestError", f"Token id {bad[0]} is out of vocabulary (0 to {vocab - 1})",
                               "prompt")
        prompt = prompt_tokens(body)
        by_completion = isinstance(body, ChatRequest) and body.max_completion_tokens is not None
        asked = body.max_completion_tokens if isinstance(body, ChatRequest) and by_completion else body.max_tokens
        if prompt >= max_len or (asked is not None and prompt + asked > max_len):
            raise ApiError(400, "BadRequestError",
                           f"This model's maximum context length is {max_len} tokens. However, you requested "
                           f"{prompt + (asked or 0)} tokens ({prompt} in the messages, {asked or 0} in the "
                           "completion). Please reduce the length of the messages or completion.",
                           ("max_completion_tokens" if by_completion else "max_tokens") if asked else "prompt")
        max_tokens = asked if asked is not None else max_len - prompt
        plan = Plan.of(max_tokens, body.stop_strings())
        headers = {k: v for k in ("traceparent", "tracestate") if (v := request.headers.get(k))}
        # The sampling parameters as vLLM resolves them before it traces the request.
        info = RequestInfo(request_id=request.headers.get("x-request-id") or f"cmpl-{secrets.token_hex(16)}",
                           max_tokens_param=max_tokens,
                           temperature=1.0 if body.temperature is None else body.temperature,
                           top_p=1.0 if body.top_p is None else body.top_p, n=body.n, trace_headers=headers)
        req = engine.submit(info, prompt, plan.max_tokens)
        req.finish_reason = plan.finish_reason
        if body.stream:
            opts = body.stream_options
            stream = _Stream(kind, req, served, plan, bool(opts and opts.include_usage),
                             bool(opts and opts.continuous_usage_stats), stream_interval)
            return StreamingResponse(stream.events(), media_type="text/event-stream")
        timing = await _finish_unless_gone(req, request)
        if timing is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        return JSONResponse(_complete(kind, req, served, plan, timing))

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

