"""The SLO state on the plane's own /metrics: a prometheus_client collector over the latest statuses.

Names are stable (controlplane.names) because dashboards and alert rules key on them. A figure with no
data (no traffic in the window) is omitted, not exported as 0 or NaN: in PromQL an absent series is
"unknown", and `controlplane_slo_window_requests` (always present) tells a dashboard why.
The collector only reads what the status provider returns; evaluation happens elsewhere (the monitor
loop), so a scrape never waits on the store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from enum import IntEnum

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane import names
from controlplane.slo.evaluate import NoData, SloStatus

log = logging.getLogger(__name__)


class AlertState(IntEnum):
    INACTIVE = 0
    PENDING = 1
    FIRING = 2


StatusProvider = Callable[[], Sequence[SloStatus]]
# slo name -> severity ("page" | "ticket") -> state; comes from the live alerting.
AlertProvider = Callable[[], Mapping[str, Mapping[str, AlertState]]]
# (slo, deployment) -> seconds since its last successful evaluation; comes from the monitor.
AgeProvider = Callable[[], Mapping[tuple[str, str], float]]

_BASE = [names.LABEL_SLO, names.LABEL_DEPLOYMENT, names.LABEL_SLI]


def _families() -> dict[str, GaugeMetricFamily]:
    g = GaugeMetricFamily
    return {
        "objective": g(names.SLO_OBJECTIVE, "SLO objective: the target fraction of good events",
                       labels=[*_BASE, names.LABEL_BUDGETING]),
        "attainment": g(names.SLO_ATTAINMENT, "Good events / known events over the SLO window (absent: no data)",
                        labels=_BASE),
        "budget": g(names.SLO_BUDGET_REMAINING,
                    "Error budget remaining over the SLO window: 1 untouched, 0 spent, < 0 overspent (absent: no data)",
                    labels=_BASE),
        "burn": g(names.SLO_BURN_RATE, "Error budget burn rate over an alert window (absent: no data)",
                  labels=[*_BASE, names.LABEL_WINDOW]),
        "requests": g(names.SLO_WINDOW_REQUESTS, "Events in the SLO window by outcome (unknown: SLI value missing)",
                      labels=[*_BASE, names.LABEL_OUTCOME]),
        "quantile": g(names.SLO_LATENCY_QUANTILE,
                      "Latency quantile over the SLO window, seconds (label sli: the latency SLI measured)",
                      labels=[*_BASE, names.LABEL_QUANTILE]),
        "alert": g(names.SLO_ALERT_STATE, "Burn-rate alert state: 0 inactive, 1 pending, 2 firing",
                   labels=[names.LABEL_SLO, names.LABEL_DEPLOYMENT, names.LABEL_SEVERITY]),
        "age": g(names.PLANE_SLO_EVALUATION_AGE, "Seconds since the SLO was last evaluated (since the plane started "
                 "when it has not been yet)", labels=[names.LABEL_SLO, names.LABEL_DEPLOYMENT]),
    }


class SloCollector(Collector):
    """Per SLO: objective, attainment, budget remaining, burn rate per window, events, quantiles, alerts."""

    def __init__(self, status_provider: StatusProvider, alert_provider: AlertProvider | None = None,
                 age_provider: AgeProvider | None = None) -> None:
        self._statuses = status_provider
        self._alerts = alert_provider
        self._ages = age_provider

    def describe(self) -> Iterator[Metric]:
        # Names only, so registering never calls the providers.
        yield from _families().values()

    def collect(self) -> Iterator[Metric]:
        fam = _families()
        try:
            statuses = list(self._statuses())
            alerts = dict(self._alerts()) if self._alerts is not None else None
            ages = dict(self._ages()) if self._ages is not None else {}
        except Exception:  # noqa: BLE001 - a broken provider must not take the plane's /metrics down
            log.exception("SLO status provider failed; exporting no SLO series this scrape")
            return
        for (slo_name, deployment), age in sorted(ages.items()):
            fam["age"].add_metric([slo_name, deployment], age)
        for st in statuses:
            slo = st.slo
            base = [slo.name, slo.deployment, slo.sli]
            fam["objective"].add_metric([*base, st.budgeting], slo.objective)
            if not isinstance(st.attainment, NoData):
                fam["attainment"].add_metric(base, st.attainment)
            if not isinstance(st.budget_remaining, NoData):
                fam["budget"].add_metric(base, st.budget_remaining)
            for label, rate in st.burn_rates().items():
                if not isinstance(rate, NoData):
                    fam["burn"].add_metric([*base, label], rate)
            c = st.counts
            for outcome, n in (("good", c.good), ("bad", c.bad), ("unknown", c.unknown)):
                fam["requests"].add_metric([*base, outcome], n)
            for q in st.quantiles:
                for quantile, value in q.values:
                    if not isinstance(value, NoData):
                        fam["quantile"].add_metric([slo.name, slo.deployment, q.sli, f"{quantile:g}"], value)
            if alerts is not None:
                # Every tier of the SLO, 0 while it has no episode (never had one, or it resolved): the alerter's
                # own state, which a dashboard or a rule reads as a number rather than as no data.
                states: dict[str, AlertState] = {w.severity: AlertState.INACTIVE
                                                 for w in slo.alerting.enabled_windows()}
                states |= dict(alerts.get(slo.name, {}))
                for severity, state in sorted(states.items()):
                    fam["alert"].add_metric([slo.name, slo.deployment, severity], int(state))
        yield from fam.values()


class LatestStatuses:
    """The last evaluation's statuses, swapped whole so a scrape never sees half an update."""

    def __init__(self) -> None:
        self._statuses: tuple[SloStatus, ...] = ()
        self._lock = threading.Lock()

    def update(self, statuses: Sequence[SloStatus]) -> None:
        with self._lock:
            self._statuses = tuple(statuses)

    def __call__(self) -> Sequence[SloStatus]:
        with self._lock:
            return self._statuses
