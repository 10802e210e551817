"""A small streaming load generator for OpenAI-compatible servers, measuring TTFT at the client.

Every request carries a fresh W3C `traceparent`, so the `llm_request` span vLLM emits for it has
the same trace id and client and server measurements can be joined exactly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

WORDS = (
    "queue prefill decode token latency replica batch cache memory engine server request "
    "budget alert window scale drain route trace span metric sample model serve fleet"
).split()


KEEPALIVE_S = 2.0  # idle connections are closed after this; replicas keep theirs longer (vllm_server)


@dataclass(frozen=True)
class RequestPlan:
    prompt: str | list[int]  # text, or token ids (no tokenisation before the engine stamps arrival)
    max_tokens: int
    delay_s: float = 0.0  # start offset from the beginning of the run


@dataclass(frozen=True)
class ClientResult:
    """One request as the client saw it. `ttft_s` and `e2e_s` run from when it was sent; `queued_s` is how long
    it went out after its planned start in `run_load` (waiting for a free slot of its concurrency, or for the
    event loop), so a caller judging latency from the planned arrival adds it (what a capped client hides:
    coordinated omission)."""

    trace_id: str
    ok: bool
    sent_unix_s: float
    ttft_s: float | None
    e2e_s: float | None
    completion_tokens: int
    error: str | None = None
    queued_s: float = 0.0
    resent: bool = False  # the first try's connection failed before any response; this is the second's


def ramp_offsets(n: int, lo_rps: float, hi_rps: float, seed: int = 0) -> list[float]:
    """Start offsets of n Poisson arrivals whose rate climbs linearly from lo_rps to hi_rps: a calibration load
    that sees small batches first and full ones last."""
    if not (lo_rps > 0 and hi_rps > 0):
        raise ValueError(f"ramp rates must be > 0 req/s, got {lo_rps} and {hi_rps}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for k in range(n):
        out.append(t)
        t += rng.expovariate(lo_rps + (hi_rps - lo_rps) * k / max(1, n - 1))
    return out


def mixed_plans(n: int, seed: int = 0, prompt_words: tuple[int, int] = (4, 200),
                max_tokens: tuple[int, int] = (4, 48), rate_per_s: float | None = None,
                token_ids: tuple[int, int] | None = None) -> list[RequestPlan]:
    """`n` requests of mixed prompt and output lengths; Poisson arrivals at `rate_per_s` if given.

    With `token_ids=(lo, hi)` prompts are lists of token ids drawn from [lo, hi) instead of text.
    """
    if rate_per_s is not None and not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate_per_s must be a finite number > 0 req/s (or None: all at once), got {rate_per_s}")
    rng = random.Random(seed)
    plans, t = [], 0.0
    for _ in range(n):
        length = rng.randint(*prompt_words)
        prompt: str | list[int] = (
            [rng.randrange(*token_ids) for _ in range(length)] if token_ids
            else " ".join(rng.choice(WORDS) for _ in range(length))
        )
        plans.append(RequestPlan(prompt, rng.randint(*max_tokens), t))
        if rate_per_s:
            t += rng.expovariate(rate_per_s)
    return plans


# Errors of a connection that gave no response at all: the server closed or reset a pooled connection as the request
# went out on it (under load vLLM's API server does so even at a 60 s keep-alive: 1 stream of 120 in a full test
# run of 2026-12-07). Like the OpenAI SDK, the client sends such a request again, once (`ClientResult.resent`); a
# timeout, a refused connection or anything after the response began is not retried.
RESENT_ERRORS = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


async def stream_one(client: httpx.AsyncClient, base_url: str, model: str, plan: RequestPlan) -> ClientResult:
    """Stream one completion. Latencies run from the first send, also for a request sent again (RESENT_ERRORS);
    the trace id is the attempt's that answered."""
    sent = time.time()
    t0 = time.perf_counter()
    result, answered = await _attempt(client, base_url, model, plan, sent, t0)
    if not answered:
        result, _ = await _attempt(client, base_url, model, plan, sent, t0)
        result = dataclasses.replace(result, resent=True)
    return result


async def _attempt(client: httpx.AsyncClient, base_url: str, model: str, plan: RequestPlan, sent: float,
                   t0: float) -> tuple[ClientResult, bool]:
    """One try; the flag is False only when it failed with one of RESENT_ERRORS before any response."""
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    body = {"model": model, "prompt": plan.prompt, "max_tokens": plan.max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True}}
    ttft: float | None = None
    responded = False
    chunks = 0
    usage_tokens: int | None = None

    def failed(error: str) -> ClientResult:
        return ClientResult(trace_id, False, sent, ttft, None, chunks, error)

    try:
        async with client.stream("POST", base_url.rstrip("/") + "/v1/completions", json=body,
                                 headers=headers) as resp:
            responded = True
            if resp.status_code != 200:
                await resp.aread()
                return ClientResult(trace_id, False, sent, None, None, 0,
                                    f"HTTP {resp.status_code}: {resp.text[:200]}"), True
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                # The first event is the first token (the usage event comes last): stamped before parsing.
                # A chunk with a choice is a token even when its text is empty (a partial UTF-8 sequence
                # from a byte-level tokenizer): TTFT is the first token, not glyph.
                now = time.perf_counter() - t0
                try:
                    chunk = json.loads(line[6:])
                except ValueError:
                    return failed(f"malformed event from the server: {line[:200]!r}"), True
                if not isinstance(chunk, dict):
                    return failed(f"malformed event from the server: {line[:200]!r}"), True
                if "error" in chunk:  # vLLM reports an error during generation as an event of a 200 stream
                    err = chunk["error"]
                    message = err.get("message") if isinstance(err, dict) else err
                    return failed(f"error event: {message!s:.200}"), True
                if ttft is None:
                    ttft = now
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    chunks += 1
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
    except httpx.HTTPError as exc:
        return failed(f"{type(exc).__name__}: {exc}"), responded or not isinstance(exc, RESENT_ERRORS)
    # The server's usage count is exact; a streamed chunk can carry more than one token.
    tokens = usage_tokens if usage_tokens is not None else chunks
    if ttft is None or not tokens:
        return failed("the stream ended without a token"), True
    return ClientResult(trace_id, True, sent, ttft, time.perf_counter() - t0, tokens), True


async def run_load(base_url: str, model: str, plans: Sequence[RequestPlan], concurrency: int = 8,
                   on_done: Callable[[ClientResult], None] | None = None,
                   timeout_s: float = 300.0) -> list[ClientResult]:
    """Send `plans` (honouring their start offsets) with at most `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)
    # Idle connections are dropped by the client after 2 s, before the server's keep-alive timeout (60 s for the
    # replicas the plane starts, vLLM's own default 5 s otherwise): at httpx's default (also 5 s) the server could
    # close one just as a request went out on it (a ReadError, no response).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                          keepalive_expiry=KEEPALIVE_S)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        # Open the keep-alive connections before the clock starts: a TCP connect is not TTFT. The plan's
        # clock starts after them: opening hundreds takes seconds on a busy server, and starting it before
        # turned the first seconds of a Poisson plan into one burst.
        # A server that is down fails each request below with its error: not the warm-up, losing them all.
        await asyncio.gather(*(client.get(base_url.rstrip("/") + "/v1/models") for _ in range(concurrency)),
                             return_exceptions=True)
        start = time.perf_counter()

        async def one(plan: RequestPlan) -> ClientResult:
            await asyncio.sleep(max(0.0, plan.delay_s - (time.perf_counter() - start)))
            async with sem:
                queued = max(0.0, time.perf_counter() - start - plan.delay_s)
                result = await stream_one(client, base_url, model, plan)
            if queued > 0:
                result = dataclasses.replace(result, queued_s=queued)
            if on_done:
                on_done(result)
            return result

        return list(await asyncio.gather(*(one(p) for p in plans)))
