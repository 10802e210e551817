"""The load generator keeps a plan's timing: offsets count from when the connections are open, not before."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from controlplane.loadgen import RequestPlan, ramp_offsets, run_load

CONNECT_DELAY_S = 0.6  # each warm-up GET /v1/models is this slow, as on a busy one-core vLLM


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    posts: list[float]

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
