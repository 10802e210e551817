"""Span coverage: the share of the inference requests the router served whose `llm_request` span reached the store.

The SLOs are judged on stored spans. A span vLLM failed to export (its exporter gives up on a batch after 10 s
of retries, e.g. while the store is locked) leaves no trace in them: attainment is then computed on a sample,
silently. The router stores its own span for every request it proxied, with the trace id vLLM's span carries
(`controlplane/supervisor/router.py`), so the plane can count what went missing.

What counts: POSTs to the completion endpoints answered in full with 200 (other paths, such as `/v1/models`,
have no `llm_request` span), ended within the window. Requests that ended within `grace_s` are not counted yet:
vLLM batches spans (0.5 s here) and may retry an export for 10 s. A client may send many requests under one
trace id (an agent's conversation), so the match is per (trace id, replica): of n router spans there, as many
are covered as vLLM spans were stored, at most n.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, and_, case, func, select

from controlplane import names
from controlplane.store.models import Deployment, Replica, Request, RouterSpan

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 300.0
DEFAULT_GRACE_S = 30.0
DEFAULT_MIN_SERVED = 100  # fewer requests than this in the window: too few to tell a loss from chance
DEFAULT_CACHE_S = 10.0  # /metrics may be scraped by several Prometheus servers
MAX_REQUEST_S = 600.0  # requests that ran longer than this are not counted
INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class Coverage:
    served: int  # inference requests the router proxied to this replica and answered in full with 200
    with_span: int  # of those, the ones whose llm_request span is stored
    deployment: str | None = None  # the replica's deployment, None when the plane does not know the replica

    def ratio(self, min_served: int = 1) -> float | None:
        """None (unknown, neither full nor zero) under `min_served` requests."""
        return self.with_span / self.served if self.served >= max(1, min_served) else None


def span_coverage(engine: Engine, since: float, until: float) -> dict[str, Coverage]:
    """Per replica the router answered from: the inference requests that started at most `MAX_REQUEST_S`
    before `since` and ended in [since, until) with a complete 200 response, and how many of them have a
    stored `llm_request` span. (The bound on the start lets the query range-scan the started index instead
    of reading every router span ever stored.)"""
    rs = RouterSpan
    served = (select(rs.trace_id, rs.replica, func.count().label("n"))
              .where(and_(rs.started_unix_s >= since - MAX_REQUEST_S, rs.started_unix_s < until,
                          rs.ended_unix_s >= since, rs.ended_unix_s < until, rs.status == 200, rs.ok.is_(True),
                          rs.method == "POST", rs.path.in_(INFERENCE_PATHS), rs.replica.is_not(None)))
              .group_by(rs.trace_id, rs.replica).subquery())
    # Looked up by trace id (the unique index's leading column). The `+ 0` on the other columns keeps SQLite
    # from range-scanning the replica's arrival index for every trace instead (measured: 29 s for 15,000
    # requests in the window, against milliseconds); PostgreSQL plans it the same either way.
    stored = (select(func.count()).select_from(Request)
              .where(Request.trace_id == served.c.trace_id, Request.replica_id + 0 == Replica.id,
                     Request.arrival_unix_s + 0 >= since - 2 * MAX_REQUEST_S, Request.arrival_unix_s + 0 < until)
              .scalar_subquery())
    per_trace = (select(served.c.replica, Deployment.name.label("deployment"), served.c.n, stored.label("m"))
                 .select_from(served)
                 .outerjoin(Replica, Replica.name == served.c.replica)
                 .outerjoin(Deployment, Deployment.id == Replica.deployment_id)
                 .subquery())
    covered = case((per_trace.c.m < per_trace.c.n, per_trace.c.m), else_=per_trace.c.n)
    stmt = (select(per_trace.c.replica, per_trace.c.deployment, func.sum(per_trace.c.n), func.sum(covered))
            .group_by(per_trace.c.replica, per_trace.c.deployment))
    with engine.connect() as conn:
        return {str(r): Coverage(int(n), int(m or 0), d) for r, d, n, m in conn.execute(stmt)}


class SpanCoverageCollector(Collector):
    """`controlplane_span_coverage_ratio{deployment, replica}` over the requests that ended between
    `window_s + grace_s` and `grace_s` ago, read at most every `cache_s`. No series for a replica with fewer
    than `min_served` such requests, and none at all when the read fails (logged): a missing figure, never a
    zero."""

    def __init__(self, source: Callable[[float, float], Mapping[str, Coverage]], *,
                 window_s: float = DEFAULT_WINDOW_S, grace_s: float = DEFAULT_GRACE_S,
                 min_served: int = DEFAULT_MIN_SERVED, cache_s: float = DEFAULT_CACHE_S,
                 clock: Callable[[], float] = time.time) -> None:
        if not window_s > 0 or not grace_s >= 0 or not cache_s >= 0 or min_served < 1:
            raise ValueError(f"window_s must be > 0, grace_s and cache_s >= 0 and min_served >= 1, got {window_s}, "
                             f"{grace_s}, {cache_s} and {min_served}")
        self.source, self.window_s, self.grace_s, self.clock = source, window_s, grace_s, clock
        self.min_served, self.cache_s = min_served, cache_s
        self._cached: tuple[float, Mapping[str, Coverage]] | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def _read(self) -> Mapping[str, Coverage] | None:
        now = self.clock()
        if self._cached is not None and now - self._cached[0] < self.cache_s:
            return self._cached[1]
        until = now - self.grace_s
        try:
            per_replica = self.source(until - self.window_s, until)
        except Exception:  # noqa: BLE001 - a failed read must not break the plane's /metrics
            log.exception("span coverage: reading the router's and vLLM's spans failed")
            return None
        self._cached = (now, per_replica)
        return per_replica

    def collect(self) -> Iterator[Metric]:
        per_replica = self._read()
        if per_replica is None:
            return
        g = GaugeMetricFamily(names.PLANE_SPAN_COVERAGE,
                              f"Share of the inference requests the router served (200, ended {self.grace_s:g}-"
                              f"{self.window_s + self.grace_s:g} s ago, at least {self.min_served}) whose "
                              "llm_request span is stored", labels=[names.LABEL_DEPLOYMENT, names.LABEL_REPLICA])
        for replica, cov in sorted(per_replica.items()):
            ratio = cov.ratio(self.min_served)
            if ratio is not None:
                g.add_metric([cov.deployment or "", replica], ratio)
        if g.samples:
            yield g
