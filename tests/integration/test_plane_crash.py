"""kill -9 of the plane while spans stream in: every batch it acknowledged is in the store.

The spans go through the OpenTelemetry SDK's own OTLP/HTTP exporter (vLLM uses OTLP/gRPC in the
other integration tests, so both transports are exercised by real exporters).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from controlplane import names
from tests.integration.conftest import start_plane, stop_plane

RESOURCE = Resource.create({names.RES_REPLICA: "sdk-0"})


def _batch(n: int) -> list[ReadableSpan]:
    now = time.time_ns()
    spans = []
    for _ in range(n):
        ctx = SpanContext(int.from_bytes(os.urandom(16), "big"), int.from_bytes(os.urandom(8), "big"),
                          is_remote=False, trace_flags=TraceFlags(1))
        spans.append(ReadableSpan(
            name=names.SPAN_LLM_REQUEST, context=ctx, kind=SpanKind.SERVER, resource=RESOURCE,
            start_time=now, end_time=now + 500_000_000,
            attributes={names.ATTR_TTFT: 0.05, names.ATTR_E2E: 0.5, names.ATTR_COMPLETION_TOKENS: 10,
                        names.ATTR_PROMPT_TOKENS: 20, names.ATTR_REQUEST_ID: f"cmpl-{ctx.span_id:x}"}))
    return spans


def test_kill_9_of_the_plane_loses_no_acknowledged_span(tmp_path: Path) -> None:
    plane = start_plane(tmp_path, [])
    exporter = OTLPSpanExporter(endpoint=plane.otlp_http, timeout=2)
    acked: list[tuple[str, str]] = []
    failed_after_kill = threading.Event()
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            batch = _batch(200)
            if exporter.export(batch) == SpanExportResult.SUCCESS:
                acked.extend((f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}") for s in batch)
            else:
                failed_after_kill.set()
                return

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(plane.proc.pid, signal.SIGKILL)  # mid-stream, no chance to flush or clean up
    plane.proc.wait(timeout=10)
    failed_after_kill.wait(timeout=30)
    stop.set()
    thread.join(timeout=30)
    exporter.shutdown()

    assert len(acked) >= 2000, "too few batches acknowledged before the kill to prove anything"
    with sqlite3.connect(plane.db_path) as db:
        stored = set(db.execute("SELECT trace_id, span_id FROM requests").fetchall())
    lost = [a for a in acked if a not in stored]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged spans lost"

    # A page the killed plane had firing, for an SLO the restarted one (with none) no longer evaluates.
    with sqlite3.connect(plane.db_path) as db:
        db.execute("INSERT INTO slo_alerts (slo, deployment, severity, alertname, state, started_unix_s, fired_unix_s, "
                   "last_eval_unix_s, evidence) VALUES ('gone', 'tiny', 'page', ?, 'firing', 1.0, 1.0, 1.0, '{}')",
                   (names.ALERT_SLO_BURN_PAGE,))
    # The plane restarts on the same store and carries on.
    again = start_plane(tmp_path, [])
    try:
        assert OTLPSpanExporter(endpoint=again.otlp_http, timeout=5).export(_batch(10)) == \
            SpanExportResult.SUCCESS
        deadline, states = time.monotonic() + 30, []
        while time.monotonic() < deadline:  # closed, not left firing for ever
            states = [a["state"] for a in httpx.get(again.api + "/api/v1/alerts", timeout=5).json()["items"]]
            if states == ["resolved"]:
                break
            time.sleep(0.2)
        assert states == ["resolved"]
    finally:
        stop_plane(again)
