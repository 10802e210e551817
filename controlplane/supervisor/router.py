"""One OpenAI-compatible endpoint in front of the ready replicas: least outstanding requests.

aiohttp on both sides (server and pooled client) because it streams chunk by chunk with little
per-request overhead; the router runs on its own thread and event loop so span ingestion or store
writes in the plane never sit between a client and its tokens. The supervisor changes the routing
table from its own thread through the lock-protected methods below.

Guarantees: a draining replica gets no new request; with no ready replica the answer is 503 with
Retry-After; a request whose replica fails before sending any response byte (connection refused or
reset: the replica died) is retried once on another replica, since a completion has no side effect
to repeat; a stream broken off mid-way is cut at the client too, never passed off as a complete
answer; W3C `traceparent`/`tracestate` pass through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
from dataclasses import dataclass

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 7.6.1) and ones aiohttp recomputes; everything else passes through.
_DROP_REQUEST = {"host", "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                 "upgrade", "content-length"}
_DROP_RESPONSE = _DROP_REQUEST | {"date", "server"}
REPLICA_HEADER = "x-controlplane-replica"


@dataclass
class _Backend:
    name: str
    url: str
    draining: bool = False
    down: bool = False  # a failed connection; cleared when the supervisor marks it ready again
    outstanding: int = 0
    routed: int = 0  # requests sent here (arrivals, for the autoscaler's request rate)
    served: int = 0


class Router:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000, retry_after_s: int = 2) -> None:
        self.host, self.port, self.retry_after_s = host, port, retry_after_s
        self._backends: dict[str, _Backend] = {}
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.bound_port: int | None = None

    # --- routing table (any thread) -------------------------------------------------------------
    def set_ready(self, name: str, url: str) -> None:
        with self._lock:
            b = self._backends.get(name)
            if b is None or b.url != url:
                self._backends[name] = _Backend(name, url.rstrip("/"))
            else:
                b.down = False

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
            self._backends.pop(name, None)

    def outstanding(self, name: str) -> int:
        with self._lock:
            b = self._backends.get(name)
            return b.outstanding if b else 0

    def snapshot(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return {n: {"url": b.url, "draining": b.draining, "down": b.down, "outstanding": b.outstanding,
                        "routed": b.routed, "served": b.served} for n, b in self._backends.items()}

    def _pick(self, exclude: set[str], arrival: bool = True) -> _Backend | None:
        with self._lock:
            ok = [b for b in self._backends.values() if not b.draining and not b.down and b.name not in exclude]
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
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        tried: set[str] = set()
        fresh_retry = False
        again: _Backend | None = None
        for attempt in range(3):
            backend = self._again(again) if again is not None else None
            again = None
            if backend is None:
                backend = self._pick(tried, arrival=attempt == 0)
            if backend is None:
                return self._unavailable("no ready replica; retry later" if not tried
                                         else "the replica failed and no other replica is ready")
            tried.add(backend.name)
            served = False
            resp: web.StreamResponse | None = None
            try:
                async with self._session.request(request.method, backend.url + request.path_qs, data=body,
                                                 headers=headers, allow_redirects=False) as up:
                    resp = web.StreamResponse(status=up.status, reason=up.reason)
                    for k, v in up.headers.items():
                        if k.lower() not in _DROP_RESPONSE:
                            resp.headers.add(k, v)
                    resp.headers[REPLICA_HEADER] = backend.name
                    await resp.prepare(request)
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                    await resp.write_eof()
                    served = True
                    return resp
            except aiohttp.ClientError as exc:
                if resp is None:
                    stale = isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and \
                        not isinstance(exc, aiohttp.ClientConnectorError)  # refused is not stale
                    if not fresh_retry and stale:
                        # Most often a kept-alive connection the replica had just closed: one more try on the
                        # same replica before calling it down.
                        fresh_retry, again = True, backend
                        continue
                    # Nothing went to the client yet (refused, or reset before the response started:
                    # the replica died): safe to send the request to another replica.
                    log.warning("router: %s failed before responding (%s); marking it down", backend.name, exc)
                    self.set_unready(backend.name)
                    continue
                # Mid-stream: the client already has part of the answer. Cut its connection so it sees
                # a broken stream, never a short one that looks complete.
                log.warning("router: %s broke off a response (%s)", backend.name, type(exc).__name__)
                if request.transport is not None:
                    request.transport.abort()
                return resp
            finally:
                self._release(backend, served)
        return self._unavailable("no replica accepted the connection")

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
        # No total timeout: a long generation streams for minutes. Connecting must be quick.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3)
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the server's sockets
        assert server is not None
        self.bound_port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
