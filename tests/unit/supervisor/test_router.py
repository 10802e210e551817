"""The router against fake OpenAI servers: streaming passthrough, least outstanding, drain, 503, traceparent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web

from controlplane.supervisor.router import REPLICA_HEADER, Router
from tests.conftest import free_port


@dataclass
class Upstream:
    """A fake vLLM: streams `chunks` SSE events; holds each request until `release` is set if asked."""

    name: str
    port: int = 0
    hold: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    die: str | None = None  # "before_response" | "mid_stream": the replica dies (kill -9) at that point
    drop_first: bool = False  # close the first request's connection unanswered (a stale keep-alive), then serve

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen_headers.append(dict(request.headers))
        self.in_flight += 1
        try:
            if self.drop_first and len(self.seen_headers) == 1 and request.transport is not None:
                request.transport.abort()
            if self.die == "before_response" and request.transport is not None:
                request.transport.abort()
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(f"data: first from {self.name}\n\n".encode())
            if self.die == "mid_stream" and request.transport is not None:
                request.transport.abort()
                return resp
            while self.hold and not self.release.is_set():
                await asyncio.sleep(0.01)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    ups = [Upstream("a"), Upstream("b")]
    loop = asyncio.new_event_loop()
    runners: list[web.AppRunner] = []

    async def start() -> None:
        for u in ups:
            app = web.Application()
            app.router.add_post("/v1/completions", u.handle)
            runner = web.AppRunner(app)
            await runner.setup()
            u.port = free_port()
            await web.TCPSite(runner, "127.0.0.1", u.port).start()
            runners.append(runner)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield ups
    for u in ups:
        u.release.set()

    async def stop() -> None:
        for r in runners:
            await r.cleanup()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.fixture
def router() -> Iterator[Router]:
    r = Router("127.0.0.1", 0)
    r.start()
    yield r
    r.stop()


def url(r: Router) -> str:
    return f"http://127.0.0.1:{r.bound_port}/v1/completions"


def post(r: Router, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url(r), json={"prompt": "x"}, headers=headers or {}, timeout=10)


def test_no_ready_replica_gets_503_with_retry_after_and_a_json_message(router: Router) -> None:
    resp = post(router)
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "2"
    assert "no ready replica" in resp.json()["error"]["message"]
    assert httpx.get(f"http://127.0.0.1:{router.bound_port}/health").status_code == 503


def test_streams_pass_through_chunk_by_chunk(router: Router, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    a.hold = True
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    with httpx.stream("POST", url(router), json={}, timeout=10) as resp:
        lines = resp.iter_lines()
        # The upstream holds the rest until we release it: a buffering proxy would never deliver this.
        assert next(lines) == "data: first from a"
        a.release.set()
        rest = [line for line in lines if line]
    assert rest == ["data: [DONE]"]
    assert resp.headers[REPLICA_HEADER] == "a"


def test_new_requests_go_to_the_replica_with_fewer_in_flight(router: Router, upstreams: list[Upstream]) -> None:
    a, b = upstreams
    a.hold = True
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    held = [threading.Thread(target=post, args=(router,)) for _ in range(3)]
    for t in held:
        t.start()
    while a.in_flight < 3:
        threading.Event().wait(0.01)
    router.set_ready("b", f"http://127.0.0.1:{b.port}")
    served = [post(router).headers[REPLICA_HEADER] for _ in range(5)]
    assert served == ["b"] * 5  # sequential requests on b finish first, so b stays the least busy
    assert router.outstanding("a") == 3
    a.release.set()
    for t in held:
        t.join(10)
    # The router releases its count just after the last byte went out: give it a moment.
    for _ in range(200):
        if router.outstanding("a") == 0:
            break
        threading.Event().wait(0.01)
    assert router.outstanding("a") == 0


def test_ties_alternate_between_replicas(router: Router, upstreams: list[Upstream]) -> None:
    for u in upstreams:
        router.set_ready(u.name, f"http://127.0.0.1:{u.port}")
    served = [post(router).headers[REPLICA_HEADER] for _ in range(6)]
    assert served.count("a") == 3 and served.count("b") == 3


def test_a_draining_replica_gets_no_new_request_but_finishes_its_own(router: Router,
                                                                      upstreams: list[Upstream]) -> None:
    a, b = upstreams
    a.hold = True
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    result: list[httpx.Response] = []
    t = threading.Thread(target=lambda: result.append(post(router)))
    t.start()
    while a.in_flight < 1:
        threading.Event().wait(0.01)
    router.set_ready("b", f"http://127.0.0.1:{b.port}")
    router.drain("a")
    assert {post(router).headers[REPLICA_HEADER] for _ in range(4)} == {"b"}
    assert router.outstanding("a") == 1
    a.release.set()
    t.join(10)
    assert result[0].status_code == 200 and result[0].text.endswith("data: [DONE]\n\n")
    router.drain("b")
    assert post(router).status_code == 503


def test_traceparent_and_other_headers_reach_the_replica(router: Router, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    post(router, {"traceparent": tp, "tracestate": "k=v", "authorization": "Bearer x"})
    seen = {k.lower(): v for k, v in a.seen_headers[-1].items()}
    assert seen["traceparent"] == tp and seen["tracestate"] == "k=v" and seen["authorization"] == "Bearer x"


def test_a_refused_connection_is_retried_on_another_replica_and_marked_down(router: Router,
                                                                             upstreams: list[Upstream]) -> None:
    b = upstreams[1]
    router.set_ready("dead", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    router.set_ready("b", f"http://127.0.0.1:{b.port}")
    served = [post(router) for _ in range(4)]
    assert all(r.status_code == 200 and r.headers[REPLICA_HEADER] == "b" for r in served)
    assert router.snapshot()["dead"]["down"] is True
    router.set_ready("dead", f"http://127.0.0.1:{b.port}")  # ready again (new URL): routable again
    assert router.snapshot()["dead"]["down"] is False


def test_a_replica_dying_before_its_response_is_retried_on_another(router: Router, upstreams: list[Upstream]) -> None:
    a, b = upstreams
    a.die = "before_response"
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    router.set_ready("b", f"http://127.0.0.1:{b.port}")
    served = [post(router) for _ in range(4)]
    assert [(r.status_code, r.headers[REPLICA_HEADER]) for r in served] == [(200, "b")] * 4
    # a gets one more try on a fresh connection (the first failure may be a stale keep-alive), then is down
    assert 1 <= len(a.seen_headers) <= 2 and router.snapshot()["a"]["down"] is True
    snap = router.snapshot()
    assert snap["a"]["routed"] + snap["b"]["routed"] == 4  # a retried request is one arrival


def test_a_dropped_connection_is_retried_on_the_same_replica_when_it_is_the_only_one(
        router: Router, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    a.drop_first = True
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    r = post(router)
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "a" and len(a.seen_headers) == 2
    assert router.snapshot()["a"]["down"] is False and router.snapshot()["a"]["routed"] == 1


def test_a_stream_broken_off_midway_is_broken_for_the_client_too(router: Router, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    a.die = "mid_stream"
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    got: list[str] = []
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", url(router), json={}, timeout=10) as resp:
        for line in resp.iter_lines():
            got.append(line)
    assert "data: [DONE]" not in got  # never a short answer that looks complete
