"""Span coverage: inference requests the router served without a stored llm_request span are counted, on SQLite
and PostgreSQL; too few requests, an empty window or a failed read is no series, never a ratio of 0 or 1."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry

from controlplane import names
from controlplane.coverage import Coverage, SpanCoverageCollector, span_coverage
from controlplane.store.repo import Store
from controlplane.supervisor.router import RouterRecord, SpanWriter


def served(k: int, replica: str | None, ended: float, status: int | None = 200, *, trace: int | None = None,
           ok: bool | None = None, method: str = "POST", path: str = "/v1/completions") -> RouterRecord:
    return RouterRecord(f"{k if trace is None else trace:032x}", f"{k:016x}", None, None, replica, ended - 1.0, ended,
                        status, (status is not None and status < 500) if ok is None else ok, method, path)


def vllm_span(k: int, replica: str, arrival: float, *, trace: int | None = None) -> dict[str, object]:
    # vLLM's own span of the same request: same trace id, its own span id
    return {"replica": replica, "request_id": f"r{k}", "arrival_unix_s": arrival, "prompt_tokens": 10,
            "completion_tokens": 4, "trace_id": f"{k if trace is None else trace:032x}",
            "span_id": f"{k + 10_000:016x}"}


def test_inference_requests_served_without_a_stored_span_are_counted_per_replica(store: Store) -> None:
    writer = SpanWriter(store.engine)
    for k in range(10):  # tiny-0: 10 served, spans of 7 stored
        writer.record(served(k, "tiny-0", 1000.0 + k, path="/v1/chat/completions" if k % 2 else "/v1/completions"))
    for k in range(10, 14):  # tiny-1: all 4 stored
        writer.record(served(k, "tiny-1", 1000.0 + k))
    writer.record(served(20, "tiny-1", 1005.0, status=400))  # refused by vLLM before any span: not counted
    writer.record(served(21, None, 1005.0, status=503))  # no replica answered: not counted
    writer.record(served(22, "tiny-0", 900.0))  # ended before the window
    writer.record(served(23, "tiny-0", 1100.0))  # ended after it
    writer.record(served(24, "tiny-0", 1001.0, ok=False))  # the client left mid-stream: no complete response
    writer.record(served(25, "tiny-0", 1001.0, method="GET", path="/v1/models"))  # no llm_request span exists
    writer.record(served(26, "tiny-0", 1001.0, path="/tokenize"))
    writer.close()
    dep = store.save_deployment("tiny", model="tiny", spec={}, desired_replicas=1, engine_config={})
    store.save_replica("tiny-0", deployment_id=dep, url=None, backend="local", state="ready", runtime=None,
                       config=None)  # tiny-1 is unknown to the plane (a replica row only from its spans)
    store.write_spans([vllm_span(k, "tiny-0", 999.0 + k) for k in range(7)]
                      + [vllm_span(k, "tiny-1", 999.0 + k) for k in range(10, 14)], [])
    got = span_coverage(store.engine, 950.0, 1050.0)
    assert got == {"tiny-0": Coverage(10, 7, "tiny"), "tiny-1": Coverage(4, 4, None)}
    assert got["tiny-0"].ratio() == pytest.approx(0.7) and got["tiny-1"].ratio() == 1.0
    assert got["tiny-1"].ratio(min_served=5) is None  # too few to judge
    assert span_coverage(store.engine, 0.0, 10.0) == {}


def test_one_trace_carrying_many_requests_is_matched_request_for_request_on_its_replica(store: Store) -> None:
    writer = SpanWriter(store.engine)
    for k in range(5):  # an agent's conversation: five requests under one client trace, to tiny-0
        writer.record(served(100 + k, "tiny-0", 1000.0 + k, trace=7))
    for k in range(3):  # a trace retried by the router onto tiny-1: its span on tiny-0 does not cover tiny-1's
        writer.record(served(200 + k, "tiny-1", 1000.0 + k, trace=8 + k))
    writer.close()
    store.write_spans([vllm_span(100, "tiny-0", 999.0, trace=7)]  # one of the five stored
                      + [vllm_span(200 + k, "tiny-0", 999.0, trace=8 + k) for k in range(3)]
                      + [vllm_span(300, "tiny-1", 999.0, trace=9)], [])
    got = span_coverage(store.engine, 950.0, 1050.0)
    assert got == {"tiny-0": Coverage(5, 1), "tiny-1": Coverage(3, 1)}


def metric(collector: SpanCoverageCollector) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {(s.labels[names.LABEL_DEPLOYMENT], s.labels[names.LABEL_REPLICA]): s.value
            for m in registry.collect() for s in m.samples}


def test_the_gauge_covers_the_window_before_the_grace_needs_enough_requests_and_is_absent_when_unknown() -> None:
    asked: list[tuple[float, float]] = []
    now = [2000.0]

    def source(since: float, until: float) -> Mapping[str, Coverage]:
        asked.append((since, until))
        return {"a-0": Coverage(400, 300, "a"), "b-0": Coverage(0, 0, "b"), "c-0": Coverage(99, 0, "c"),
                "x": Coverage(200, 200)}

    cov = SpanCoverageCollector(source, window_s=300.0, grace_s=30.0, min_served=100, cache_s=10.0,
                                clock=lambda: now[0])
    # b-0 served nothing and c-0 too little to judge: no series, not 0 and not 1; x has no known deployment
    assert metric(cov) == {("a", "a-0"): 0.75, ("", "x"): 1.0}
    assert asked == [(1670.0, 1970.0)]
    now[0] = 2005.0  # within cache_s: the same figures, no second read
    assert metric(cov) == {("a", "a-0"): 0.75, ("", "x"): 1.0} and len(asked) == 1
    now[0] = 2011.0
    metric(cov)
    assert asked[-1] == (1681.0, 1981.0)

    def broken(_since: float, _until: float) -> Mapping[str, Coverage]:
        raise RuntimeError("database is locked")

    assert metric(SpanCoverageCollector(broken)) == {}
    with pytest.raises(ValueError, match="min_served >= 1"):
        SpanCoverageCollector(source, min_served=0)
