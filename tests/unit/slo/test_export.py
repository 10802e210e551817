"""The SLO state on /metrics: stable names, one series per window, no data omitted, alert states optional."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane import names
from controlplane.slo.evaluate import Counts, NoData, Quantiles, SloStatus, build_status, burn_windows_of
from controlplane.slo.export import AlertState, LatestStatuses, SloCollector
from tests.unit.slo.factories import make_slo


def _status(total: int = 1000, bad: int = 5, *, empty_5m: bool = False) -> SloStatus:
    slo = make_slo(objective=0.99, window_s=30 * 86400.0, name="chat-ttft", deployment="chat")
    burn = {s: Counts(total - bad, total) for s in burn_windows_of(slo)}
    if empty_5m:
        burn[300.0] = Counts(0, 0)
    quantiles = (Quantiles("ttft", total, ((0.5, 0.08), (0.99, 0.41)), 0.005),)
    return build_status(slo, 0.0, (0.0, 1.0), Counts(total - bad, total, 7), burn, quantiles)


def _scrape(collector: SloCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _get(samples: dict, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    base = {"slo": "chat-ttft", "deployment": "chat", "sli": "ttft"}
    return samples.get((name, tuple(sorted({**base, **labels}.items()))))


def test_an_slo_exports_objective_attainment_budget_burn_per_window_requests_and_quantiles() -> None:
    samples = _scrape(SloCollector(lambda: [_status()]))
    assert _get(samples, names.SLO_OBJECTIVE, budgeting="occurrences") == 0.99
    assert _get(samples, names.SLO_ATTAINMENT) == 0.995
    assert abs((_get(samples, names.SLO_BUDGET_REMAINING) or 0) - 0.5) < 1e-12
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        assert abs((_get(samples, names.SLO_BURN_RATE, window=window) or 0) - 0.5) < 1e-12, window
    assert _get(samples, names.SLO_WINDOW_REQUESTS, outcome="good") == 995
    assert _get(samples, names.SLO_WINDOW_REQUESTS, outcome="bad") == 5
    assert _get(samples, names.SLO_WINDOW_REQUESTS, outcome="unknown") == 7
    assert _get(samples, names.SLO_LATENCY_QUANTILE, quantile="0.99") == 0.41
    assert not any(name == names.SLO_ALERT_STATE for name, _ in samples)  # no alerting wired: absent, not 0


def test_no_data_figures_are_omitted_while_the_request_counts_say_why() -> None:
    status = _status(total=0, bad=0, empty_5m=True)
    status = replace(status, quantiles=(Quantiles("ttft", 0, ((0.99, NoData()),), 0.005),))
    samples = _scrape(SloCollector(lambda: [status]))
    assert _get(samples, names.SLO_ATTAINMENT) is None
    assert _get(samples, names.SLO_BUDGET_REMAINING) is None
    assert _get(samples, names.SLO_BURN_RATE, window="1h") is None
    assert _get(samples, names.SLO_LATENCY_QUANTILE, quantile="0.99") is None
    assert _get(samples, names.SLO_WINDOW_REQUESTS, outcome="good") == 0
    assert _get(samples, names.SLO_OBJECTIVE, budgeting="occurrences") == 0.99
    assert all(v == v for v in samples.values())  # no NaN anywhere


def test_only_the_empty_window_loses_its_burn_rate() -> None:
    samples = _scrape(SloCollector(lambda: [_status(empty_5m=True)]))
    assert _get(samples, names.SLO_BURN_RATE, window="5m") is None
    assert _get(samples, names.SLO_BURN_RATE, window="1h") is not None


def test_alert_states_are_exported_per_severity_when_alerting_provides_them() -> None:
    alerts = {"chat-ttft": {"page": AlertState.FIRING, "ticket": AlertState.PENDING}, "other": {"page": 2}}
    samples = _scrape(SloCollector(lambda: [_status()], lambda: alerts))  # type: ignore[arg-type, return-value]
    base = {"slo": "chat-ttft", "deployment": "chat"}
    assert samples[(names.SLO_ALERT_STATE, tuple(sorted({**base, "severity": "page"}.items())))] == 2
    assert samples[(names.SLO_ALERT_STATE, tuple(sorted({**base, "severity": "ticket"}.items())))] == 1
    assert sum(1 for name, _ in samples if name == names.SLO_ALERT_STATE) == 2  # unknown SLOs are not invented


def test_a_failing_status_provider_costs_the_slo_series_but_not_the_scrape() -> None:
    def broken() -> list[SloStatus]:
        raise RuntimeError("store down")

    assert _scrape(SloCollector(broken)) == {}


def test_registering_the_collector_does_not_call_the_provider() -> None:
    calls: list[int] = []
    CollectorRegistry().register(SloCollector(lambda: calls.append(1) or []))  # type: ignore[func-returns-value]
    assert calls == []


def test_latest_statuses_hand_out_the_last_update_whole() -> None:
    latest = LatestStatuses()
    assert list(latest()) == []
    latest.update([_status(), _status(total=10)])
    assert [s.counts.total for s in latest()] == [1000, 10]


def test_a_tier_without_an_episode_reads_inactive_not_no_data() -> None:
    # Never fired, or resolved (the alerter drops resolved episodes): 0, as the metric's help says.
    samples = _scrape(SloCollector(lambda: [_status()], lambda: {}))
    base = {"slo": "chat-ttft", "deployment": "chat"}
    for severity in ("page", "ticket"):
        assert samples[(names.SLO_ALERT_STATE, tuple(sorted({**base, "severity": severity}.items())))] == 0
