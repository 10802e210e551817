"""One OpenAI-compatible endpoint in front of the ready replicas: least outstanding requests.

aiohttp on both sides (server and pooled client) because it streams chunk by chunk with little
per-request overhead; the router runs on its own thread and event loop so span ingestion or store
writes in the plane never sit between a client and its tokens. The supervisor changes the routing
table from its own thread through the lock-protected methods below.

Guarantees: when the router fronts several models (deployments, see `set_models`), a request naming
one of them in its JSON `model` goes only to that model's replicas (503 while none is ready), and one
naming another model (a LoRA adapter, a typo) goes to any replica, whose vLLM answers it, and
GET /v1/models lists every ready deployment's models (each vLLM lists only its own); a draining
replica gets no new request; with no ready replica the answer is 503 with
Retry-After; a request whose replica refuses the connection goes to another replica (nothing of it ran),
and the replica is marked down until its next passing probe; a connection the replica closes unanswered
(most often a kept-alive one it had just closed) is tried once more on the same replica: refused then,
the replica died and the request goes to another one (a completion has no side effect to repeat);
dropped again by a replica still listening, the client gets a 502 and no other replica sees the request,
so a request that breaks replicas cannot go round the fleet; a stream broken off mid-way is cut at the
client too, never passed off as a complete answer; a valid W3C `traceparent` (and its `tracestate`) passes
through unchanged, and a request without one (or with an invalid one) gets a new trace, so every request's
vLLM span has a trace id.

Each proxied request is reported once, as the router's span (`RouterRecord`: trace id, tenant from
the tenant header, replica, times, status) to a `RequestRecorder`; `SpanWriter` stores them in
batches from its own thread, so the event loop never waits on the store. Cost per tenant joins these
spans to vLLM's request spans by trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Final, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Engine, insert

from controlplane import names
from controlplane.store.models import RouterSpan

log = logging.getLogger(__name__)

# Idle connections to replicas are kept this long; replicas started by the plane keep theirs longer (vllm_server).
KEEPALIVE_S = 30
# The longest a replica may stay silent before its answer starts or between two chunks of it. A non-streamed
# answer starts only once it is whole, so this bounds the longest non-streamed generation too.
DEFAULT_READ_TIMEOUT_S = 600.0
# Hop-by-hop headers (RFC 9110 7.6.1) and ones aiohttp recomputes; everything else passes through.
_DROP_REQUEST = {"host", "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                 "upgrade", "content-length"}
_DROP_RESPONSE = _DROP_REQUEST | {"date", "server"}
REPLICA_HEADER = "x-controlplane-replica"
_PARSE_INLINE_BYTES: Final = 64 * 1024  # bodies past this are parsed for their model on a worker thread
TENANT_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# W3C Trace Context level 1: version-traceid-parentid-flags in lowercase hex; a later version may append
# fields after a dash, version 00 may not. The format is four fixed-width fields, so a regex is all a
# parser needs (the OpenTelemetry API package, which has one, is not a dependency of the plane).
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACE_HEADERS: Final = ("traceparent", "tracestate")


@dataclass(frozen=True)
class TraceContext:
    """The router's place in a request's trace. `traceparent` is the header to send upstream instead of
    the client's (None: the client's valid one goes through unchanged, with its tracestate)."""

    trace_id: str
    span_id: str  # the router's own span
    parent_span_id: str | None  # the client's span, when it sent a valid traceparent
    traceparent: str | None


def _random_hex(bits: int) -> str:
    """A random non-zero id of `bits` bits in lowercase hex (all zeros is invalid in W3C trace context)."""
    while True:
        if v := random.getrandbits(bits):
            return f"{v:0{bits // 4}x}"


def trace_context(traceparents: Sequence[str], new_id: Callable[[int], str] = _random_hex) -> TraceContext:
    """Keep the client's trace when it sent exactly one valid traceparent; otherwise start a new, sampled one
    whose parent is the router's span (so vLLM's span becomes the router span's child)."""
    m = _TRACEPARENT.fullmatch(traceparents[0].strip()) if len(traceparents) == 1 else None
    if m is not None:
        version, trace_id, parent_id, flags, rest = m.groups()
        valid = (version != "ff" and not (version == "00" and rest) and trace_id != "0" * 32
                 and parent_id != "0" * 16)
        if valid and int(flags, 16) & 1:
            return TraceContext(trace_id, new_id(64), parent_id, None)
        if valid:
            # Not sampled by the client: vLLM's parent-based sampler would record no llm_request span, and the
            # request would be missing from the SLOs and the cost. Same trace, sampled, the router span as parent.
            span_id = new_id(64)
            return TraceContext(trace_id, span_id, parent_id, f"00-{trace_id}-{span_id}-01")
    trace_id, span_id = new_id(128), new_id(64)
    return TraceContext(trace_id, span_id, None, f"00-{trace_id}-{span_id}-01")


def forwarded_headers(incoming: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """The client's request headers to send upstream: every value of a repeated header (a dict kept only the
    last), less the hop-by-hop ones, which include any the client's `Connection` header names (RFC 9110
    7.6.1)."""
    items = list(incoming.items())
    named = {t.strip().lower() for k, v in items if k.lower() == "connection" for t in v.split(",")}
    return CIMultiDict((k, v) for k, v in items if k.lower() not in _DROP_REQUEST and k.lower() not in named)


def valid_tenant(values: Sequence[str]) -> str | None:
    """The tenant named by the header's values, or None unless there is exactly one valid value."""
    if len(values) != 1 or not TENANT_PATTERN.fullmatch(values[0]):
        return None
    return values[0]


@dataclass(frozen=True)
class RouterRecord:
    """One proxied request: the router's span. `ok` = a complete response with a status below 500."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    tenant: str | None
    replica: str | None  # the replica that answered (the last one tried); None when none did
    started_unix_s: float
    ended_unix_s: float
    status: int | None  # sent to the client; None when the client left before a status went out
    ok: bool
    method: str | None = None
    path: str | None = None  # without the query string (it may carry what a client would not have stored)


class RequestRecorder(Protocol):
    """Where the router reports its spans. `record` runs on the router's event loop: it must not block.
    `close` runs once when the router stops, after the last `record`."""

    def record(self, r: RouterRecord) -> None: ...
    def close(self) -> None: ...


@dataclass
class _Outcome:
    replica: str | None = None
    status: int | None = None
    ok: bool = False


_RETIRED_KEPT = 1024  # removed replicas whose arrival counts are remembered
MAX_BODY_BYTES = 64 * 2**20  # a request body over this gets a 413


@dataclass
class _Backend:
    name: str
    url: str
    model: str | None = None  # the served model name; None: unknown (takes any request)
    draining: bool = False
    down: bool = False  # a failed connection; cleared when the supervisor marks it ready again
    outstanding: int = 0
    routed: int = 0  # requests sent here (arrivals, for the autoscaler's request rate)
    served: int = 0


class Router:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000, retry_after_s: int = 2, *,
                 recorder: RequestRecorder | None = None, tenant_header: str = names.TENANT_HEADER,
                 registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time,
                 read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S) -> None:
        """`read_timeout_s`: the longest a replica may stay silent, before its answer starts or between two
        chunks of it (None: for ever); past it the client gets a 504 or a cut stream."""
        self.host, self.port, self.retry_after_s = host, port, retry_after_s
        self.read_timeout_s = read_timeout_s
        self.recorder, self.tenant_header, self.clock = recorder, tenant_header, clock
        self.tenants_rejected = Counter(names.PLANE_ROUTER_TENANT_REJECTED,
                                        f"Requests whose {tenant_header} header was not 1-64 characters of "
                                        "[A-Za-z0-9._-] (served, recorded without a tenant)", registry=registry)
        self._backends: dict[str, _Backend] = {}
        self._models: frozenset[str] = frozenset()  # the deployments' served names (see set_models)
        # They and the table's models: kept with the table (under the lock) so no request rebuilds it.
        self._known_models: frozenset[str] = frozenset()
        # Arrivals of replicas no longer in the table (removed after a drain, or re-added at a new URL): kept so
        # the tuner's rate sees the requests they took between its last reading and their removal.
        self._retired: dict[str, int] = {}
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.bound_port: int | None = None

    # --- routing table (any thread) -------------------------------------------------------------
    def set_ready(self, name: str, url: str, model: str | None = None) -> None:
        with self._lock:
            b = self._backends.get(name)
            if b is None or b.url != url.rstrip("/") or b.model != model:
                before = b.routed if b is not None else self._retired.pop(name, 0)
                self._backends[name] = _Backend(name, url.rstrip("/"), model, routed=before)
                self._refresh_models()
            else:
                b.down = False

    def set_models(self, models: set[str] | frozenset[str]) -> None:
        """The models the plane's deployments serve: known even while none of their replicas is ready, so
        a request for one waits for it (503) rather than going to another model's replica."""
        with self._lock:
            self._models = frozenset(models)
            self._refresh_models()

    def _refresh_models(self) -> None:  # with the lock held
        self._known_models = self._models | {b.model for b in self._backends.values() if b.model is not None}

    def set_unready(self, name: str) -> None:
        with self._lock:
            if name in self._backends:
                self._backends[name].down = True

    def drain(self, name: str) -> None:
        with self._lock:
            if name in self._backends:
                self._backends[name].draining = True

    def remove(self, name: str) -> None:
        with self._lock:
            b = self._backends.pop(name, None)
            if b is not None:
                self._refresh_models()
                self._retired[name] = b.routed
                while len(self._retired) > _RETIRED_KEPT:
                    self._retired.pop(next(iter(self._retired)))

    def arrivals(self) -> dict[str, int]:
        """Requests routed to each replica since the router started (a monotonic counter per name, removed
        replicas included): the tuner's request rate is the change between two readings."""
        with self._lock:
            return {**self._retired, **{n: b.routed for n, b in self._backends.items()}}

    def outstanding(self, name: str) -> int:
        with self._lock:
            b = self._backends.get(name)
            return b.outstanding if b else 0

    def snapshot(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return {n: {"url": b.url, "draining": b.draining, "down": b.down, "outstanding": b.outstanding,
                        "routed": b.routed, "served": b.served} for n, b in self._backends.items()}

    def _pick(self, exclude: set[str], arrival: bool = True, model: str | None = None) -> _Backend | None:
        with self._lock:
            ok = [b for b in self._backends.values() if not b.draining and not b.down and b.name not in exclude
                  and (model is None or b.model is None or b.model == model)]
            if not ok:
                return None
            least = min(b.outstanding for b in ok)
            tied = [b for b in ok if b.outstanding == least]
            pick = tied[next(self._rr) % len(tied)]
            pick.outstanding += 1
            pick.routed += int(arrival)  # a retry is the same arrival: counted once
            return pick

    def _again(self, b: _Backend) -> _Backend | None:
        """The same replica once more, if it is still routable (a retry: not a new arrival)."""
        with self._lock:
            if self._backends.get(b.name) is not b or b.draining or b.down:
                return None
            b.outstanding += 1
            return b

    def _release(self, b: _Backend, served: bool) -> None:
        with self._lock:
            b.outstanding -= 1
            b.served += int(served)

    # --- HTTP -------------------------------------------------------------------------------------
    def _unavailable(self, why: str) -> web.Response:
        body = {"error": {"message": why, "type": "service_unavailable", "code": 503}}
        return web.Response(status=503, text=json.dumps(body), content_type="application/json",
                            headers={"Retry-After": str(self.retry_after_s)})

    async def _health(self, request: web.Request) -> web.Response:
        with self._lock:
            ready = sum(1 for b in self._backends.values() if not b.draining and not b.down)
        if ready == 0:
            return self._unavailable("no ready replica")
        return web.json_response({"status": "ok", "ready_replicas": ready})

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        """Forward the request (see `_forward`) and report it as the router's span, however it ends."""
        started = self.clock()
        ctx = trace_context(request.headers.getall("traceparent", []))
        tenant_values = request.headers.getall(self.tenant_header, [])
        tenant = valid_tenant(tenant_values)
        if tenant_values and tenant is None:
            self.tenants_rejected.inc()
        headers = forwarded_headers(request.headers)
        if ctx.traceparent is not None:
            # A new trace: the client's tracestate (if any) belongs to no trace. The client's trace re-sampled:
            # its tracestate stays.
            for h in _TRACE_HEADERS if ctx.parent_span_id is None else ("traceparent",):
                headers.popall(h, None)
            headers["traceparent"] = ctx.traceparent
        outcome = _Outcome()
        try:
            resp = await self._forward(request, headers, outcome)
            if outcome.status is None:  # answered by the router itself (503)
                outcome.status = resp.status
            return resp
        finally:
            if self.recorder is not None:
                record = RouterRecord(ctx.trace_id, ctx.span_id, ctx.parent_span_id, tenant, outcome.replica,
                                      started, self.clock(), outcome.status, outcome.ok, request.method,
                                      request.path[:300])
                try:
                    self.recorder.record(record)
                except Exception:  # noqa: BLE001 - a lost span must never fail the client's request
                    log.exception("router: recording the span of trace %s failed", ctx.trace_id)

    async def _model_for(self, request: web.Request, body: bytes) -> str | None:
        """The model to route to: the body's `model` when the router fronts several and it is one of them,
        else None (any replica). With one model the body is never parsed; a large one is parsed off the
        event loop, so it never holds up other streams."""
        models = self._known_models  # replaced whole under the lock: one read is consistent
        if len(models) < 2 or request.method != "POST" or not body:
            return None
        try:
            doc = json.loads(body) if len(body) < _PARSE_INLINE_BYTES else await asyncio.to_thread(json.loads, body)
        except (ValueError, RecursionError):  # not JSON (or absurdly nested): any replica answers it
            return None
        model = doc.get("model") if isinstance(doc, dict) else None
        return model if isinstance(model, str) and model in models else None

    async def _forward(self, request: web.Request, headers: CIMultiDict[str],
                       outcome: _Outcome) -> web.StreamResponse:
        assert self._session is not None
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            outcome.status = 413
            limit = MAX_BODY_BYTES
            return web.json_response({"error": {"message": f"the request body is over the router's limit of "
                                                           f"{limit // 2**20} MiB", "type": "invalid_request_error",
                                                "code": 413}}, status=413)
        if request.method == "GET" and request.path == "/v1/models" and len(self._known_models) > 1:
            return await self._list_models(headers, outcome)
        model = await self._model_for(request, body)
        tried: set[str] = set()
        fresh_retry = False
        again: _Backend | None = None
        for attempt in range(3):
            backend = self._again(again) if again is not None else None
            session = self._fresh_session if backend is not None else self._session
            assert session is not None
            again = None
            if backend is None:
                # An arrival is an inference request: GET /v1/models and the like are not load.
                backend = self._pick(tried, arrival=attempt == 0 and request.method == "POST", model=model)
            if backend is None:
                return self._unavailable("no ready replica; retry later" if not tried
                                         else "the replica failed and no other replica is ready")
            tried.add(backend.name)
            served = False
            resp: web.StreamResponse | None = None
            try:
                async with session.request(request.method, backend.url + request.path_qs, data=body,
                                           headers=headers, allow_redirects=False) as up:
                    resp = web.StreamResponse(status=up.status, reason=up.reason)
                    for k, v in up.headers.items():
                        if k.lower() not in _DROP_RESPONSE:
                            resp.headers.add(k, v)
                    resp.headers[REPLICA_HEADER] = backend.name
                    await resp.prepare(request)
                    outcome.replica, outcome.status = backend.name, up.status
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                    await resp.write_eof()
                    served = True
                    outcome.ok = up.status < 500
                    return resp
            except aiohttp.SocketTimeoutError:
                # The replica took the request and went silent: it may still be working on it, so sending it to
                # another replica could run it twice. The client is told; the replica is not marked down (the
                # supervisor's probes judge its health).
                log.warning("router: %s sent nothing for %gs; %s", backend.name, self.read_timeout_s,
                            "answering 504" if resp is None else "cutting the stream")
                if resp is None:
                    outcome.replica, outcome.status = backend.name, 504
                    return web.json_response({"error": {
                        "message": f"replica {backend.name} sent nothing for {self.read_timeout_s:g} s (the "
                                   f"router's read timeout); the request may still run there",
                        "type": "timeout", "code": 504}}, status=504)
                if request.transport is not None:
                    request.transport.abort()
                return resp
            except aiohttp.ClientError as exc:
                if resp is None:
                    if isinstance(exc, aiohttp.ClientConnectorError):
                        # Refused (or unreachable): nothing of the request ran there, so another replica may
                        # take it. The replica is down until its next passing probe puts it back.
                        log.warning("router: %s refused the connection (%s); marking it down", backend.name, exc)
                        self.set_unready(backend.name)
                        continue
                    if not fresh_retry:
                        # Closed unanswered: most often a kept-alive connection the replica had just closed,
                        # or the replica died. One more try on it tells which (a refusal: it died).
                        fresh_retry, again = True, backend
                        continue
                    # Dropped twice by a replica that still takes connections (or one answering garbage): it may
                    # be this request that breaks it. It goes to no other replica, and the replica is not marked
                    # down for it (its probes judge its health).
                    log.warning("router: %s dropped a request twice without answering (%s); answering 502",
                                backend.name, type(exc).__name__)
                    outcome.replica, outcome.status = backend.name, 502
                    return web.json_response({"error": {
                        "message": f"replica {backend.name} closed the connection twice without answering; the "
                                   "request was not sent to another replica", "type": "bad_gateway",
                        "code": 502}}, status=502)
                # Mid-stream: the client already has part of the answer. Cut its connection so it sees
                # a broken stream, never a short one that looks complete.
                if isinstance(exc, ConnectionResetError):  # writing to the client failed: it left, not the replica
                    log.debug("router: the client of a response from %s went away", backend.name)
                else:
                    log.warning("router: %s broke off a response (%s)", backend.name, type(exc).__name__)
                if request.transport is not None:
                    request.transport.abort()
                return resp
            finally:
                self._release(backend, served)
        return self._unavailable("no replica accepted the connection")

    async def _list_models(self, headers: CIMultiDict[str], outcome: _Outcome) -> web.Response:
        """GET /v1/models across deployments: each replica lists only the model it serves, so with several
        the router asks one ready replica of each (the next one when it fails to answer) and joins their lists
        (first listing of an id wins). A model with no ready or answering replica is left out rather than
        failing the list."""
        session = self._session
        assert session is not None
        with self._lock:
            by_model: dict[str | None, list[_Backend]] = {}
            for b in self._backends.values():
                if not b.draining and not b.down:
                    by_model.setdefault(b.model, []).append(b)
        if not by_model:
            return self._unavailable("no ready replica; retry later")

        async def listing(b: _Backend) -> list[object]:
            try:
                async with session.get(b.url + "/v1/models", headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=5)) as up:
                    if up.status != 200:
                        return []
                    data = (await up.json(content_type=None)).get("data")
                    return data if isinstance(data, list) else []
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
                log.warning("router: listing the models of %s failed (%s)", b.name, type(exc).__name__)
                return []

        async def first_listing(replicas: list[_Backend]) -> list[object]:
            for b in replicas:  # the next ready replica of the model when one fails to answer
                if entries := await listing(b):
                    return entries
            return []

        merged: dict[str, object] = {}
        for entries in await asyncio.gather(*(first_listing(bs) for bs in by_model.values())):
            for entry in entries:
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    merged.setdefault(entry["id"], entry)
        if not merged:
            return self._unavailable("no replica answered the model listing; retry later")
        outcome.status, outcome.ok = 200, True
        return web.json_response({"object": "list", "data": list(merged.values())})

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> int:
        """Serve on a background thread; returns the bound port (useful with port 0)."""
        self._thread = threading.Thread(target=self._serve, name="router", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s) or self._error is not None:
            raise OSError(f"router could not start on {self.host}:{self.port}: {self._error}")
        assert self.bound_port is not None
        return self.bound_port

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._astop())
            loop.close()

    async def _astart(self) -> None:
        # No total timeout: a long generation streams for minutes. Connecting must be quick, and a replica that
        # stays silent past the read timeout (a hung engine the plane does not supervise) must not hold the
        # client for ever.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=self.read_timeout_s)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            auto_decompress=False)
        # The second try after a connection closed unanswered goes on a new connection, never a pooled one: a
        # second kept-alive connection the replica closed meanwhile would fail it as well, and answer a 502.
        self._fresh_session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=True), auto_decompress=False)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        # handler_cancellation: a client that hangs up cancels its handler (off by default since aiohttp 3.9),
        # which closes the connection to the replica, so vLLM aborts the request as it would for the client
        # itself, instead of generating a whole answer for nobody while it counts as in flight.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the server's sockets
        assert server is not None
        self.bound_port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if self.recorder is not None:
            self.recorder.close()


class SpanWriter:
    """A `RequestRecorder` that stores the router's spans in `router_spans`, in batches, from its own thread.

    `record` only enqueues. The writer takes whatever has queued up (at most `max_batch` rows) in one
    transaction, so batches grow with the request rate and a span waits at most one write. A full queue
    (the store is slower than the traffic) or a failed write drops spans, counted by reason: the spans
    are for cost attribution, and serving requests matters more than recording them.
    """

    def __init__(self, engine: Engine, *, registry: CollectorRegistry | None = None, max_batch: int = 1000,
                 max_queue: int = 100_000) -> None:
        self.engine, self.max_batch = engine, max_batch
        self._queue: queue.Queue[RouterRecord | None] = queue.Queue(maxsize=max_queue)
        self.dropped = Counter(names.PLANE_ROUTER_SPANS_DROPPED, "Router spans not stored, by reason",
                               [names.LABEL_REASON], registry=registry)
        self._thread = threading.Thread(target=self._run, name="router-spans", daemon=True)
        self._thread.start()

    def record(self, r: RouterRecord) -> None:
        try:
            self._queue.put_nowait(r)
        except queue.Full:
            self.dropped.labels("queue_full").inc()

    def close(self, timeout_s: float = 10.0) -> None:
        """Store what is queued, then stop the thread (waiting at most `timeout_s` for the store)."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.error("router: the span queue stayed full for %gs; unsaved spans are lost", timeout_s)
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        done = False
        while not done:
            batch: list[RouterRecord] = []
            item = self._queue.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            done = item is None
            if batch:
                self._write(batch)

    def _write(self, batch: list[RouterRecord]) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(RouterSpan), [asdict(r) for r in batch])
        except Exception:  # noqa: BLE001 - the store may be back for the next batch; the thread must live on
            log.exception("router: storing %d span(s) failed; they are dropped", len(batch))
            self.dropped.labels("store_error").inc(len(batch))
