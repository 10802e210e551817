"""The load generator keeps a plan's timing: offsets count from when the connections are open, not before."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from controlplane.loadgen import ClientResult, RequestPlan, mixed_plans, ramp_offsets, run_load, stream_one
from tests.conftest import free_port

CONNECT_DELAY_S = 0.6  # each warm-up GET /v1/models is this slow, as on a busy one-core vLLM


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    posts: list[float]
    post_delay_s = 0.0  # each answer takes this long

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        time.sleep(CONNECT_DELAY_S)
        body = b'{"data": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self.server.posts.append(time.perf_counter())  # type: ignore[attr-defined]
        time.sleep(self.post_delay_s)
        self.rfile.read(int(self.headers["Content-Length"]))
        events = [{"choices": [{"text": "a"}]}, {"choices": [], "usage": {"completion_tokens": 1}}]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        raw = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.posts = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_planned_offsets_count_from_the_end_of_the_connection_warm_up(server: ThreadingHTTPServer) -> None:
    gap = 0.3
    plans = [RequestPlan("x", 1, delay_s=k * gap) for k in range(4)]
    url = f"http://127.0.0.1:{server.server_address[1]}"
    results = asyncio.run(run_load(url, "m", plans, concurrency=len(plans)))
    assert all(r.ok for r in results), [r.error for r in results]
    sent = sorted(server.posts)  # type: ignore[attr-defined]
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    # Were the clock started before the slow warm-up, the first requests' offsets would have passed during it
    # and they would all go out at once (gaps near 0).
    assert min(gaps) > gap * 0.6, gaps


def test_a_ramp_starts_at_zero_and_its_gaps_shrink_as_the_rate_climbs() -> None:
    offsets = ramp_offsets(4000, 1.0, 10.0, seed=3)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    first, last = sum(gaps[:500]) / 500, sum(gaps[-500:]) / 500
    assert first == pytest.approx(1 / 1.5, rel=0.2) and last == pytest.approx(1 / 9.5, rel=0.2)
    assert ramp_offsets(10, 1.0, 10.0, seed=3) == ramp_offsets(10, 1.0, 10.0, seed=3)  # repeatable


def test_a_ramp_refuses_a_rate_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="ramp rates must be > 0 req/s, got 0.0 and 5.0"):
        ramp_offsets(5, 0.0, 5.0)


def _answer(events: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="".join(f"data: {e}\n\n" for e in events),
                              headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handler)


@pytest.mark.parametrize("events, error", [
    # vLLM reports an error during generation as an event of a 200 stream.
    (['{"error": {"message": "engine dead", "code": 500}}', "[DONE]"], "error event: engine dead"),
    (["[DONE]"], "the stream ended without a token"),
    (["{not json", "[DONE]"], "malformed event from the server"),
    (['["a list"]', "[DONE]"], "malformed event from the server"),
], ids=["error event", "no token", "not json", "not an object"])
def test_a_stream_that_serves_no_token_is_a_failure_not_a_fast_success(events: list[str], error: str) -> None:
    async def go() -> ClientResult:
        async with httpx.AsyncClient(transport=_answer(events)) as client:
            return await stream_one(client, "http://replica", "m", RequestPlan("x", 4))

    result = asyncio.run(go())
    assert not result.ok and result.error is not None and result.error.startswith(error)
    assert result.e2e_s is None and result.ttft_s is None


def test_a_server_that_is_down_fails_each_request_instead_of_the_whole_run() -> None:
    results = asyncio.run(run_load(f"http://127.0.0.1:{free_port()}", "m", [RequestPlan("x", 1)] * 3,
                                   concurrency=2, timeout_s=5))
    assert len(results) == 3 and not any(r.ok for r in results)
    assert all(r.error and r.error.startswith("ConnectError") for r in results)


def test_a_request_waiting_for_a_slot_says_how_long(server: ThreadingHTTPServer) -> None:
    _Handler.post_delay_s = 0.3
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        results = asyncio.run(run_load(url, "m", [RequestPlan("x", 1)] * 3, concurrency=1))
    finally:
        _Handler.post_delay_s = 0.0
    queued = sorted(r.queued_s for r in results)
    assert all(r.ok for r in results) and queued[0] < 0.1 and queued[1] > 0.25 and queued[2] > 0.55


@pytest.mark.parametrize("rate", [0.0, -2.0, float("nan"), float("inf")])
def test_mixed_plans_refuse_a_rate_that_is_not_a_positive_number(rate: float) -> None:
    with pytest.raises(ValueError, match="rate_per_s must be a finite number > 0"):
        mixed_plans(4, rate_per_s=rate)


def _failing_first(exc: type[httpx.TransportError], events: list[str]) -> tuple[httpx.MockTransport, list[str]]:
    """Fails the first request with `exc` (no response), answers the rest; records each request's traceparent."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["traceparent"])
        if len(seen) == 1:
            raise exc("connection reset", request=request)
        return httpx.Response(200, text="".join(f"data: {e}\n\n" for e in events),
                              headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handler), seen


TOKEN = '{"choices": [{"text": "a"}]}'


@pytest.mark.parametrize("exc", [httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError])
def test_a_request_lost_before_any_response_is_sent_again_once(exc: type[httpx.TransportError]) -> None:
    transport, seen = _failing_first(exc, [TOKEN, TOKEN, "[DONE]"])

    async def go() -> ClientResult:
        async with httpx.AsyncClient(transport=transport) as client:
            return await stream_one(client, "http://replica", "m", RequestPlan("x", 2))

    result = asyncio.run(go())
    assert result.ok and result.resent and result.completion_tokens == 2 and len(seen) == 2
    # The result names the trace of the try that answered (the one whose span the server stores).
    assert seen[0] != seen[1] and seen[1].split("-")[1] == result.trace_id


@pytest.mark.parametrize("exc", [httpx.ConnectError, httpx.ReadTimeout])
def test_a_refused_or_timed_out_request_is_not_sent_again(exc: type[httpx.TransportError]) -> None:
    transport, seen = _failing_first(exc, [TOKEN, "[DONE]"])

    async def go() -> ClientResult:
        async with httpx.AsyncClient(transport=transport) as client:
            return await stream_one(client, "http://replica", "m", RequestPlan("x", 1))

    result = asyncio.run(go())
    assert not result.ok and not result.resent and len(seen) == 1
    assert result.error is not None and result.error.startswith(exc.__name__)


def test_a_stream_cut_after_the_response_began_is_not_sent_again() -> None:
    seen: list[int] = []

    class Cut(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield f"data: {TOKEN}\n\n".encode()
            raise httpx.ReadError("cut")

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        return httpx.Response(200, stream=Cut(), headers={"content-type": "text/event-stream"})

    async def go() -> ClientResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_one(client, "http://replica", "m", RequestPlan("x", 4))

    result = asyncio.run(go())
    assert not result.ok and not result.resent and len(seen) == 1 and result.error == "ReadError: cut"
