"""The router against fake OpenAI servers: streaming passthrough, least outstanding, drain, 503, traceparent,
and the span it records per request (trace id, tenant)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from controlplane import names
from controlplane.supervisor.router import (
    MAX_BODY_BYTES,
    REPLICA_HEADER,
    Router,
    RouterRecord,
    trace_context,
    valid_tenant,
)
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
    models: list[str] = field(default_factory=list)  # what GET /v1/models lists (vLLM: its served name, adapters)
    listed: int = 0  # GET /v1/models answered or refused
    answer_after_s: float | None = None  # answer whole after this long, unless the caller goes away (as vLLM)
    saw_caller_leave: threading.Event = field(default_factory=threading.Event)
    seen_raw: list[list[tuple[str, str]]] | None = None  # every header as sent, repeats included

    async def list_models(self, request: web.Request) -> web.Response:
        self.listed += 1
        if self.die == "before_response" and request.transport is not None:
            request.transport.abort()
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen_headers.append(dict(request.headers))
        if self.seen_raw is not None:
            self.seen_raw.append(list(request.headers.items()))
        self.in_flight += 1
        try:
            if self.answer_after_s is not None:  # vLLM's with_cancellation: a caller that leaves aborts it
                for _ in range(int(self.answer_after_s / 0.01)):
                    if request.transport is None or request.transport.is_closing():
                        self.saw_caller_leave.set()
                        return web.Response(status=499)
                    await asyncio.sleep(0.01)
                return web.json_response({"choices": [{"text": "done"}]})
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
                if request.transport is None or request.transport.is_closing():
                    self.saw_caller_leave.set()
                    return resp
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
            app.router.add_get("/v1/models", u.list_models)
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


def test_repeated_headers_pass_whole_and_headers_the_connection_header_names_are_dropped(
        router: Router, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    seen: list[list[tuple[str, str]]] = []
    a.seen_raw = seen
    headers = [("X-Dup", "1"), ("X-Dup", "2"), ("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "yes")]
    assert httpx.post(url(router), json={"prompt": "x"}, headers=headers, timeout=10).status_code == 200
    got = [(k.lower(), v) for k, v in seen[0]]
    assert [v for k, v in got if k == "x-dup"] == ["1", "2"]  # a dict kept only the last
    assert not any(k == "x-secret-hop" for k, _ in got)  # hop-by-hop, as its Connection header says


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


def _wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def _dies_on_first_request() -> tuple[int, list[bytes]]:
    """A replica killed (-9) with its first request read: the connection is reset unanswered and its port then
    refuses connections. Returns its port and what it read."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        got.append(conn.recv(65536))
        srv.close()  # the process is gone: nothing listens on its port any more
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset, no response

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], got


def test_a_replica_dying_before_its_response_is_retried_on_another(router: Router, upstreams: list[Upstream]) -> None:
    b = upstreams[1]
    port, got = _dies_on_first_request()
    router.set_ready("a", f"http://127.0.0.1:{port}")
    router.set_ready("b", f"http://127.0.0.1:{b.port}")
    b.hold = True  # b busy with one request: the next goes to a (fewer in flight)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(post, router)
        while not b.in_flight:
            time.sleep(0.01)
        pool.submit(lambda: (_wait_for(lambda: b.in_flight >= 2), b.release.set()))  # the retried one came
        died = post(router)
        assert busy.result().status_code == 200
    # a took it and died; the second try on a (the first failure may have been a stale keep-alive) was refused,
    # so nothing of it runs any more: b served it, and a is down.
    assert len(got) == 1 and b"/v1/completions" in got[0]
    assert died.status_code == 200 and died.headers[REPLICA_HEADER] == "b" and len(b.seen_headers) == 2
    assert router.snapshot()["a"]["down"] is True
    snap = router.snapshot()
    assert snap["a"]["routed"] + snap["b"]["routed"] == 2  # a retried request is one arrival


def test_a_request_a_live_replica_drops_twice_gets_a_502_and_no_other_replica_sees_it(
        router: Router, upstreams: list[Upstream]) -> None:
    # A request that makes the engine drop its connection (a "query of death") must not go round the fleet,
    # nor take every replica it met out of routing.
    a, b = upstreams
    a.die = "before_response"  # closes each connection unanswered, and keeps listening
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    r = post(router)
    router.set_ready("b", f"http://127.0.0.1:{b.port}")
    assert r.status_code == 502 and r.headers["content-type"].startswith("application/json")
    assert "closed the connection twice" in r.json()["error"]["message"]
    assert len(a.seen_headers) == 2 and not b.seen_headers
    assert router.snapshot()["a"]["down"] is False and router.snapshot()["a"]["outstanding"] == 0


def test_a_dropped_connection_is_retried_on_the_same_replica_when_it_is_the_only_one(
        router: Router, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    a.drop_first = True
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    r = post(router)
    assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "a" and len(a.seen_headers) == 2
    assert router.snapshot()["a"]["down"] is False and router.snapshot()["a"]["routed"] == 1
    # The second try went on a connection of its own, not another pooled one the replica may have closed too.
    assert a.seen_headers[0].get("Connection") is None and a.seen_headers[1].get("Connection") == "close"


def test_only_inference_requests_count_as_arrivals_and_counts_outlive_removal(router: Router,
                                                                             upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    for _ in range(3):
        assert post(router).status_code == 200
    httpx.get(f"http://127.0.0.1:{router.bound_port}/v1/models", timeout=10)  # forwarded, but not load
    assert router.arrivals() == {"a": 3}
    router.drain("a")
    router.remove("a")  # drained and removed: its requests still count for the rate between two readings
    assert router.arrivals() == {"a": 3} and "a" not in router.snapshot()
    router.set_ready("a", f"http://127.0.0.1:{a.port}")  # back (a restart): the count goes on, never down
    post(router)
    assert router.arrivals() == {"a": 4}


def test_a_stream_broken_off_midway_is_broken_for_the_client_too(router: Router, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    a.die = "mid_stream"
    router.set_ready("a", f"http://127.0.0.1:{a.port}")
    got: list[str] = []
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", url(router), json={}, timeout=10) as resp:
        for line in resp.iter_lines():
            got.append(line)
    assert "data: [DONE]" not in got  # never a short answer that looks complete


# --- the router's spans: trace context and tenant -------------------------------------------------------------
class Recorded:
    """A recorder keeping the router's spans in a list; `wait` blocks until `n` have arrived."""

    def __init__(self) -> None:
        self.records: list[RouterRecord] = []
        self.closed = False
        self._cond = threading.Condition()

    def record(self, r: RouterRecord) -> None:
        with self._cond:
            self.records.append(r)
            self._cond.notify_all()

    def close(self) -> None:
        self.closed = True

    def wait(self, n: int) -> list[RouterRecord]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.records) >= n, timeout=10), self.records
            return list(self.records)


@dataclass
class Traced:
    router: Router
    recorder: Recorded
    registry: CollectorRegistry


@pytest.fixture
def traced() -> Iterator[Traced]:
    rec, registry = Recorded(), CollectorRegistry()
    r = Router("127.0.0.1", 0, recorder=rec, registry=registry, clock=iter(range(1000, 10**6)).__next__)
    r.start()
    yield Traced(r, rec, registry)
    r.stop()


def upstream_headers(u: Upstream) -> dict[str, str]:
    return {k.lower(): v for k, v in u.seen_headers[-1].items()}


def test_a_request_without_traceparent_gets_a_new_sampled_trace_and_the_span_records_it(
        traced: Traced, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    traced.router.set_ready("a", f"http://127.0.0.1:{a.port}")
    post(traced.router, {"tracestate": "orphan=1"})
    post(traced.router)
    first, second = traced.recorder.wait(2)
    sent = upstream_headers(a)
    version, trace_id, parent_id, flags = sent["traceparent"].split("-")
    assert (version, flags) == ("00", "01")
    # The router's span is vLLM's parent: same trace, and the parent id sent is the router span's id.
    assert (second.trace_id, second.span_id, second.parent_span_id) == (trace_id, parent_id, None)
    assert first.trace_id != second.trace_id and len(trace_id) == 32 and int(trace_id, 16) != 0
    assert "tracestate" not in {k.lower() for k in a.seen_headers[0]}  # it belonged to no trace we keep
    assert (second.replica, second.status, second.ok, second.tenant) == ("a", 200, True, None)
    assert second.started_unix_s < second.ended_unix_s  # the injected clock ticks once per reading
    assert (second.method, second.path) == ("POST", "/v1/completions")  # what span coverage counts by


def test_a_client_traceparent_is_kept_and_the_router_span_is_its_child(traced: Traced,
                                                                        upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    traced.router.set_ready("a", f"http://127.0.0.1:{a.port}")
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    post(traced.router, {"traceparent": tp, "tracestate": "k=v"})
    (rec,) = traced.recorder.wait(1)
    assert upstream_headers(a)["traceparent"] == tp and upstream_headers(a)["tracestate"] == "k=v"
    assert rec.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and rec.parent_span_id == "00f067aa0ba902b7"
    assert rec.span_id != rec.parent_span_id and len(rec.span_id) == 16


def test_an_invalid_client_traceparent_is_replaced_by_a_new_trace(traced: Traced, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    traced.router.set_ready("a", f"http://127.0.0.1:{a.port}")
    bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"  # an all-zero trace id is invalid
    post(traced.router, {"traceparent": bad, "tracestate": "k=v"})
    (rec,) = traced.recorder.wait(1)
    sent = upstream_headers(a)
    assert sent["traceparent"] == f"00-{rec.trace_id}-{rec.span_id}-01" and "tracestate" not in sent


def test_the_tenant_header_is_recorded_with_the_span(traced: Traced, upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    traced.router.set_ready("a", f"http://127.0.0.1:{a.port}")
    post(traced.router, {names.TENANT_HEADER: "team-a.prod_1"})
    (rec,) = traced.recorder.wait(1)
    assert rec.tenant == "team-a.prod_1"
    assert traced.registry.get_sample_value(f"{names.PLANE_ROUTER_TENANT_REJECTED}_total") == 0


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "tenant/1", "é"])
def test_a_bad_tenant_value_is_served_recorded_as_null_and_counted(traced: Traced, upstreams: list[Upstream],
                                                                    bad: str) -> None:
    a = upstreams[0]
    traced.router.set_ready("a", f"http://127.0.0.1:{a.port}")
    resp = httpx.post(url(traced.router), json={}, headers=[(names.TENANT_HEADER, bad.encode())], timeout=10)
    (rec,) = traced.recorder.wait(1)
    assert resp.status_code == 200 and rec.tenant is None and rec.ok
    assert traced.registry.get_sample_value(f"{names.PLANE_ROUTER_TENANT_REJECTED}_total") == 1


def test_the_tenant_header_name_is_configurable(upstreams: list[Upstream]) -> None:
    rec = Recorded()
    r = Router("127.0.0.1", 0, recorder=rec, tenant_header="x-org")
    r.start()
    try:
        r.set_ready("a", f"http://127.0.0.1:{upstreams[0].port}")
        post(r, {"x-org": "acme", names.TENANT_HEADER: "ignored"})
        assert rec.wait(1)[0].tenant == "acme"
    finally:
        r.stop()
    assert rec.closed  # the router closes its recorder when it stops


def test_requests_the_router_answers_itself_or_cuts_are_recorded_as_not_ok(traced: Traced,
                                                                           upstreams: list[Upstream]) -> None:
    post(traced.router, {names.TENANT_HEADER: "t1"})  # no replica: 503 from the router
    a = upstreams[0]
    a.die = "mid_stream"
    traced.router.set_ready("a", f"http://127.0.0.1:{a.port}")
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", url(traced.router), json={}, timeout=10) as resp:
        for _ in resp.iter_lines():
            pass
    unavailable, cut = traced.recorder.wait(2)
    assert (unavailable.replica, unavailable.status, unavailable.ok, unavailable.tenant) == (None, 503, False, "t1")
    assert (cut.replica, cut.status, cut.ok) == ("a", 200, False)


def test_trace_context_follows_w3c_validity() -> None:
    ids = iter(["s1", "t2", "s2"])
    keep = trace_context(["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"], lambda _bits: next(ids))
    # not sampled by the client: the same trace goes on sampled, the router's span as the parent
    assert (keep.trace_id, keep.span_id, keep.parent_span_id, keep.traceparent) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "s1", "00f067aa0ba902b7", "00-4bf92f3577b34da6a3ce929d0e0e4736-s1-01")
    sampled = trace_context(["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"], lambda _bits: "s9")
    assert (sampled.span_id, sampled.traceparent) == ("s9", None)  # sampled: passes through unchanged
    new = trace_context([], lambda _bits: next(ids))
    assert (new.trace_id, new.span_id, new.traceparent) == ("t2", "s2", "00-t2-s2-01")
    good = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for bad in ([f"ff-{good}"], [f"00-{good}-extra"], [f"00-{good.upper()}"], [f"00-{good}", f"00-{good}"],
                ["00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"], ["garbage"]):
        assert trace_context(bad).traceparent is not None, bad
    assert trace_context([f"01-{good}-future-field"]).traceparent is None  # a later version may add fields


@pytest.mark.parametrize(("values", "tenant"), [
    (["acme"], "acme"), (["A.b_c-9"], "A.b_c-9"), (["x" * 64], "x" * 64), ([], None), (["x" * 65], None),
    (["a", "b"], None), ([" acme"], None), (["acme\n"], None),
])
def test_valid_tenant_takes_one_value_of_1_to_64_safe_characters(values: list[str], tenant: str | None) -> None:
    assert valid_tenant(values) == tenant


def test_with_two_deployments_a_request_goes_only_to_replicas_of_the_model_it_names(
    router: Router, upstreams: list[Upstream]
) -> None:
    a, b = upstreams
    router.set_models({"llama", "qwen"})
    router.set_ready("llama-0", f"http://127.0.0.1:{a.port}", "llama")
    router.set_ready("qwen-0", f"http://127.0.0.1:{b.port}", "qwen")
    for model, replica in [("llama", "llama-0"), ("qwen", "qwen-0")] * 3:
        resp = httpx.post(url(router), json={"model": model, "prompt": "x"}, timeout=10)
        assert resp.status_code == 200 and resp.headers[REPLICA_HEADER] == replica
    # A name the router does not know (a LoRA adapter, a typo) goes to a replica: vLLM answers for it.
    assert httpx.post(url(router), json={"model": "adapter-x", "prompt": "x"}, timeout=10).status_code == 200
    # qwen's only replica gone (crashed, or draining): a qwen request waits for one, never goes to llama.
    router.remove("qwen-0")
    busy = httpx.post(url(router), json={"model": "qwen", "prompt": "x"}, timeout=10)
    assert busy.status_code == 503 and "retry-after" in busy.headers
    assert httpx.post(url(router), json={"model": "llama", "prompt": "x"}, timeout=10).status_code == 200
    # A body that is not JSON, or nested past the parser's depth, is not the router's to refuse.
    deep = httpx.post(url(router), content=b"[" * 200_000, timeout=10)
    assert deep.status_code == 200 and len(b.seen_headers) == 3


def test_with_two_deployments_the_model_list_joins_one_ready_replica_of_each(
    router: Router, upstreams: list[Upstream]
) -> None:
    a, b = upstreams
    a.models, b.models = ["llama", "llama-lora"], ["qwen"]
    models = f"http://127.0.0.1:{router.bound_port}/v1/models"
    router.set_ready("llama-0", f"http://127.0.0.1:{a.port}", "llama")
    assert [m["id"] for m in httpx.get(models, timeout=10).json()["data"]] == ["llama", "llama-lora"]  # passed on
    router.set_models({"llama", "qwen"})
    router.set_ready("qwen-0", f"http://127.0.0.1:{b.port}", "qwen")
    router.set_ready("llama-1", f"http://127.0.0.1:{a.port}", "llama")  # a second replica: listed once
    listed = httpx.get(models, timeout=10).json()
    assert listed["object"] == "list" and sorted(m["id"] for m in listed["data"]) == ["llama", "llama-lora", "qwen"]
    # A replica that fails to answer: the next ready one of its model is asked; with none, the model is left out.
    b.die = "before_response"
    router.set_ready("qwen-1", f"http://127.0.0.1:{a.port}", "qwen")  # a second qwen replica (a's port)
    before = a.listed
    assert sorted(m["id"] for m in httpx.get(models, timeout=10).json()["data"]) == ["llama", "llama-lora"]
    assert a.listed - before == 2  # once for llama, once for qwen after qwen-0 failed
    router.remove("qwen-1")
    assert [m["id"] for m in httpx.get(models, timeout=10).json()["data"]] == ["llama", "llama-lora"]
    router.drain("llama-0")
    router.drain("llama-1")
    assert httpx.get(models, timeout=10).status_code == 503  # nothing ready answered
    assert router.arrivals() == {"llama-0": 0, "qwen-0": 0, "llama-1": 0, "qwen-1": 0}  # listings are not load


def test_a_client_that_hangs_up_aborts_its_request_on_the_replica(traced: Traced, upstreams: list[Upstream],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Connected directly, vLLM aborts a request whose client left; through the router it must too, or the replica
    # generates the whole answer for nobody while the request counts as in flight.
    a = upstreams[0]
    a.answer_after_s = 5.0
    traced.router.set_ready("a", f"http://127.0.0.1:{a.port}")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url(traced.router), json={"prompt": "x"}, timeout=0.3)
    assert a.saw_caller_leave.wait(3.0), "the replica kept generating for a client that left"
    (gone,) = traced.recorder.wait(1)
    assert (gone.replica, gone.status, gone.ok) == (None, None, False)  # no status went out
    assert traced.router.outstanding("a") == 0

    a.answer_after_s, a.hold = None, True  # a stream the client leaves after its first event
    a.saw_caller_leave.clear()
    with httpx.stream("POST", url(traced.router), json={}, timeout=10) as resp:
        next(resp.iter_lines())
    assert a.saw_caller_leave.wait(3.0) and wait_for(lambda: traced.router.outstanding("a") == 0)
    assert not [r for r in caplog.records if "broke off" in r.getMessage()]  # the replica did nothing wrong


def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_body_over_the_limit_gets_a_json_413_recorded_with_its_status(traced: Traced,
                                                                         upstreams: list[Upstream]) -> None:
    traced.router.set_ready("a", f"http://127.0.0.1:{upstreams[0].port}")
    resp = httpx.post(url(traced.router), content=b"x" * (MAX_BODY_BYTES + 1), timeout=30)
    assert resp.status_code == 413 and "64 MiB" in resp.json()["error"]["message"]
    (rec,) = traced.recorder.wait(1)
    assert (rec.status, rec.ok) == (413, False) and not upstreams[0].seen_headers


def test_a_replica_silent_past_the_read_timeout_gets_the_client_a_504_or_a_cut_stream(
        upstreams: list[Upstream]) -> None:
    a, b = upstreams
    r = Router("127.0.0.1", 0, read_timeout_s=0.3)
    r.start()
    try:
        r.set_ready("a", f"http://127.0.0.1:{a.port}")
        a.answer_after_s = 5.0  # a non-streamed answer that does not come in time
        resp = post(r)
        assert resp.status_code == 504 and "read timeout" in resp.json()["error"]["message"]
        assert a.saw_caller_leave.wait(5)  # the replica sees the caller leave, so vLLM aborts the request
        r.set_ready("b", f"http://127.0.0.1:{b.port}")
        assert not b.seen_headers  # not retried elsewhere: the request may still run on the silent replica
        assert not r._backends["a"].down  # nor is the replica called down: its probes judge its health
        # A stream that goes silent midway is cut, never ended as if complete.
        r.set_unready("b")
        a.answer_after_s, a.hold = None, True
        a.saw_caller_leave.clear()
        got: list[str] = []
        with pytest.raises(httpx.HTTPError), httpx.stream("POST", url(r), json={}, timeout=10) as resp:
            for line in resp.iter_lines():
                got.append(line)
        assert got[0] == "data: first from a" and "data: [DONE]" not in got
        assert a.saw_caller_leave.wait(5)
    finally:
        r.stop()
