"""Span coverage: requests the router served without a stored llm_request span are counted, on SQLite and
PostgreSQL; an empty window or a failed read is no series, never a ratio of 0 or 1."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry

from controlplane import names
from controlplane.coverage import Coverage, SpanCoverageCollector, span_coverage
from controlplane.store.repo import Store
from controlplane.supervisor.router import RouterRecord, SpanWriter


def served(k: int, replica: str | None, ended: float, status: int | None = 200) -> RouterRecord:
    return RouterRecord(f"{k:032x}", f"{k:016x}", None, None, replica, ended - 1.0, ended, status,
                        status is not None and status < 500)


def vllm_span(k: int, replica: str, arrival: float) -> dict[str, object]:
    # vLLM's own span of the same request: same trace id, its own span id
    return {"replica": replica, "request_id": f"r{k}", "arrival_unix_s": arrival, "prompt_tokens": 10,
            "completion_tokens": 4, "trace_id": f"{k:032x}", "span_id": f"{k + 10_000:016x}"}


def test_requests_served_without_a_stored_span_are_counted_per_replica(store: Store) -> None:
    writer = SpanWriter(store.engine)
    for k in range(10):  # tiny-0: 10 served, spans of 7 stored
        writer.record(served(k, "tiny-0", 1000.0 + k))
    for k in range(10, 14):  # tiny-1: all 4 stored
        writer.record(served(k, "tiny-1", 1000.0 + k))
    writer.record(served(20, "tiny-1", 1005.0, status=400))  # refused by vLLM before any span: not counted
    writer.record(served(21, None, 1005.0, status=503))  # no replica answered: not counted
    writer.record(served(22, "tiny-0", 900.0))  # ended before the window
    writer.record(served(23, "tiny-0", 1100.0))  # ended after it
    writer.record(RouterRecord(f"{24:032x}", f"{24:016x}", None, None, "tiny-0", 1000.0, 1001.0, 200, False))
    # ^ the client left mid-stream: vLLM aborted it, no complete response, not counted
    writer.close()
    dep = store.save_deployment("tiny", model="tiny", spec={}, desired_replicas=1, engine_config={})
    store.save_replica("tiny-0", deployment_id=dep, url=None, backend="local", state="ready", runtime=None,
                       config=None)  # tiny-1 is unknown to the plane (a replica row only from its spans)
    store.write_spans([vllm_span(k, "tiny-0", 999.0 + k) for k in range(7)]
                      + [vllm_span(k, "tiny-1", 999.0 + k) for k in range(10, 14)], [])
    got = span_coverage(store.engine, 950.0, 1050.0)
    assert got == {"tiny-0": Coverage(10, 7, "tiny"), "tiny-1": Coverage(4, 4, None)}
    assert got["tiny-0"].ratio == pytest.approx(0.7) and got["tiny-1"].ratio == 1.0
    assert span_coverage(store.engine, 0.0, 10.0) == {}


def metric(source: object, now: float = 2000.0) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(SpanCoverageCollector(source, window_s=300.0, grace_s=30.0,  # type: ignore[arg-type]
                                            clock=lambda: now))
    return {(s.labels[names.LABEL_DEPLOYMENT], s.labels[names.LABEL_REPLICA]): s.value
            for m in registry.collect() for s in m.samples}


def test_the_gauge_covers_the_window_before_the_grace_and_is_absent_when_unknown() -> None:
    asked: list[tuple[float, float]] = []

    def source(since: float, until: float) -> Mapping[str, Coverage]:
        asked.append((since, until))
        return {"a-0": Coverage(4, 3, "a"), "b-0": Coverage(0, 0, "b"), "x": Coverage(2, 2)}

    # b-0 served nothing: no series, not 0 and not 1; x is a replica the plane has no deployment for
    assert metric(source) == {("a", "a-0"): 0.75, ("", "x"): 1.0}
    assert asked == [(1670.0, 1970.0)]

    def broken(_since: float, _until: float) -> Mapping[str, Coverage]:
        raise RuntimeError("database is locked")

    assert metric(broken) == {}
    with pytest.raises(ValueError, match="window_s must be > 0"):
        SpanCoverageCollector(source, window_s=0.0)
