"""Span coverage: the share of the requests the router served whose `llm_request` span reached the store.

The SLOs are judged on stored spans. A span vLLM failed to export (its exporter gives up on a batch after 10 s
of retries, e.g. while the store is locked) leaves no trace in them: attainment is then computed on a sample,
silently. The router stores its own span for every request it proxied, with the trace id vLLM's span carries
(`controlplane/supervisor/router.py`), so the plane can count what went missing. Requests that ended within
`grace_s` are not counted yet: vLLM batches spans (0.5 s here) and may retry an export for 10 s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, and_, exists, func, select

from controlplane import names
from controlplane.store.models import Deployment, Replica, Request, RouterSpan

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 300.0
DEFAULT_GRACE_S = 30.0
MAX_REQUEST_S = 600.0  # requests that ran longer than this are not counted


@dataclass(frozen=True)
class Coverage:
    served: int  # requests the router proxied to this replica and answered with 200
    with_span: int  # of those, the ones whose llm_request span is stored
    deployment: str | None = None  # the replica's deployment, None when the plane does not know the replica

    @property
    def ratio(self) -> float | None:
        """None when the router served nothing in the window: unknown, not full and not zero."""
        return self.with_span / self.served if self.served else None


def span_coverage(engine: Engine, since: float, until: float) -> dict[str, Coverage]:
    """Per replica the router answered from: requests that started at most `MAX_REQUEST_S` before `since`,
    ended in [since, until) with a complete 200 response, and how many of them have a stored `llm_request`
    span with the same trace id. (The bound on the start lets the query range-scan the started index instead
    of reading every router span ever stored.)"""
    rs = RouterSpan
    stored = exists().where(Request.trace_id == rs.trace_id)
    stmt = (select(rs.replica, Deployment.name, func.count(), func.count().filter(stored))
            .outerjoin(Replica, Replica.name == rs.replica)
            .outerjoin(Deployment, Deployment.id == Replica.deployment_id)
            .where(and_(rs.started_unix_s >= since - MAX_REQUEST_S, rs.started_unix_s < until,
                        rs.ended_unix_s >= since, rs.ended_unix_s < until, rs.status == 200, rs.ok.is_(True),
                        rs.replica.is_not(None)))
            .group_by(rs.replica, Deployment.name))
    with engine.connect() as conn:
        return {str(r): Coverage(int(n), int(m), d) for r, d, n, m in conn.execute(stmt)}


class SpanCoverageCollector(Collector):
    """`controlplane_span_coverage_ratio{deployment, replica}` over the requests that ended between `window_s + grace_s`
    and `grace_s` ago, computed at scrape time. No series for a replica the router served nothing from there,
    and none at all when the read fails (logged): a missing figure, never a zero."""

    def __init__(self, source: Callable[[float, float], Mapping[str, Coverage]], *,
                 window_s: float = DEFAULT_WINDOW_S, grace_s: float = DEFAULT_GRACE_S,
                 clock: Callable[[], float] = time.time) -> None:
        if not window_s > 0 or not grace_s >= 0:
            raise ValueError(f"window_s must be > 0 and grace_s >= 0, got {window_s} and {grace_s}")
        self.source, self.window_s, self.grace_s, self.clock = source, window_s, grace_s, clock

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        until = self.clock() - self.grace_s
        try:
            per_replica = self.source(until - self.window_s, until)
        except Exception:  # noqa: BLE001 - a failed read must not break the plane's /metrics
            log.exception("span coverage: reading the router's and vLLM's spans failed")
            return
        g = GaugeMetricFamily(names.PLANE_SPAN_COVERAGE,
                              f"Share of the requests the router served (status 200, ended {self.grace_s:g}-"
                              f"{self.window_s + self.grace_s:g} s ago) whose llm_request span is stored",
                              labels=[names.LABEL_DEPLOYMENT, names.LABEL_REPLICA])
        for replica, cov in sorted(per_replica.items()):
            if cov.ratio is not None:
                g.add_metric([cov.deployment or "", replica], cov.ratio)
        if g.samples:
            yield g
