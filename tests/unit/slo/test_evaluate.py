"""The SLO arithmetic against hand-computed cases: budgets, burn rates, no data, windows, timeslices."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from controlplane.slo.evaluate import (
    Counts,
    NoData,
    attainment,
    budget_remaining,
    build_status,
    burn_rate,
    burn_windows_of,
    month_start_utc,
    timeslice_counts,
    window_range,
)
from controlplane.slo.model import Alerting, SloWindow, workbook_windows
from tests.unit.slo.factories import make_slo


def _ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_burn_rate_is_the_bad_fraction_over_the_allowed_bad_fraction() -> None:
    # 99.9%: budget 0.1%. 10 bad of 1000 = 1% bad = 10x the budget rate.
    assert burn_rate(Counts(990, 1000), 0.999) == pytest.approx(10.0)
    # 100% errors against 99.9%: the 1000x ceiling of the workbook.
    assert burn_rate(Counts(0, 50), 0.999) == pytest.approx(1000.0)
    assert burn_rate(Counts(1000, 1000), 0.999) == 0.0


def test_budget_remaining_is_one_minus_the_spent_share_and_goes_negative_when_overspent() -> None:
    # 99%: 1000 events allow 10 bad. 5 bad spend half.
    assert budget_remaining(Counts(995, 1000), 0.99) == pytest.approx(0.5)
    assert budget_remaining(Counts(990, 1000), 0.99) == pytest.approx(0.0)
    assert budget_remaining(Counts(970, 1000), 0.99) == pytest.approx(-2.0)
    assert budget_remaining(Counts(1000, 1000), 0.99) == 1.0


def test_zero_traffic_is_no_data_never_nan_or_inf() -> None:
    empty = Counts(0, 0, unknown=12)
    for value in (attainment(empty), burn_rate(empty, 0.99), budget_remaining(empty, 0.99)):
        assert isinstance(value, NoData)
        assert str(value) == "no data"


def test_unknown_requests_are_neither_good_nor_bad() -> None:
    c = Counts(good=9, total=10, unknown=5)
    assert c.bad == 1
    assert attainment(c) == pytest.approx(0.9)
    assert burn_rate(c, 0.9) == pytest.approx(1.0)


def test_inconsistent_counts_and_objectives_are_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match="good=11 total=10"):
        Counts(11, 10)
    with pytest.raises(ValueError, match=r"within \(0, 1\), got 1.0"):
        burn_rate(Counts(1, 1), 1.0)


def test_sums_of_sketch_estimates_carry_their_bounds() -> None:
    exact = Counts(10, 20, 1)
    estimate = Counts(5, 10, 0, "sketch", (4, 6))
    total = exact + estimate
    assert (total.good, total.total, total.unknown, total.method, total.good_bounds) == (15, 30, 1, "sketch", (14, 16))
    assert (exact + exact).good_bounds is None
    with pytest.raises(ValueError, match="cannot add exact counts to counters counts"):
        exact + Counts(1, 1, method="counters")


def test_calendar_month_windows_start_at_the_utc_month_start() -> None:
    assert month_start_utc(_ts(2024, 3, 15, 12, 30)) == _ts(2024, 3, 1)
    assert month_start_utc(_ts(2024, 3, 1)) == _ts(2024, 3, 1)
    assert month_start_utc(_ts(2024, 1, 1) - 0.001) == _ts(2023, 12, 1)
    now = _ts(2024, 2, 29, 23, 59)
    assert window_range(SloWindow("calendar_month", 30 * 86400.0), now) == (_ts(2024, 2, 1), now)
    assert window_range(SloWindow("rolling", 28 * 86400.0), now) == (now - 28 * 86400.0, now)


def test_timeslices_count_slices_with_traffic_and_call_a_slice_good_when_it_meets_the_objective() -> None:
    slices = [Counts(9, 10), Counts(10, 10), Counts(0, 0, unknown=3), Counts(5, 10), Counts(0, 1)]
    assert timeslice_counts(slices, 0.9) == Counts(2, 4, requests=31)
    assert timeslice_counts([], 0.9) == Counts(0, 0, requests=0)
    # As exact as the least exact slice: one judged on a sketch estimate makes the count an estimate, bounded by
    # the slices good at either end of their own bounds; engine counters say so too.
    sketched = [Counts(9, 10), Counts(8.5, 10, method="sketch", good_bounds=(8.0, 9.0)), Counts(5, 10)]
    got = timeslice_counts(sketched, 0.9)
    assert (got.good, got.total, got.method, got.good_bounds) == (1, 3, "sketch", (1.0, 2.0))
    counted = timeslice_counts([Counts(9, 10, method="counters")] * 2, 0.9)
    assert (counted.method, counted.good_bounds) == ("counters", None)


def test_the_minimum_request_rate_of_timeslice_alerts_is_in_requests_not_slices() -> None:
    # 10 req/s, every request late, min_request_rate_per_s 0.1: one-minute slices are 1/60 per second, so a
    # rate read from the slice count could never reach 0.1 and nothing would ever fire.
    from controlplane.slo.alert_state import condition
    from controlplane.slo.evaluate import build_status

    slo = replace(make_slo(objective=0.999, window_s=30 * 86400.0), budgeting="timeslices",
                  alerting=Alerting(min_request_rate_per_s=0.1, windows=workbook_windows()))
    lengths = {w for t in slo.alerting.windows for w in (t.long_s, t.short_s)}
    burn = {w: timeslice_counts([Counts(0, 600)] * int(w // 60), slo.objective) for w in lengths}
    status = build_status(slo, 1e9, (1e9 - 30 * 86400.0, 1e9), burn[max(lengths)], burn)
    assert status.burn[0].long.request_rate_per_s == pytest.approx(10.0)
    assert condition(status, "page").active


def test_a_status_has_a_burn_rate_for_every_alert_window_and_no_data_where_a_window_is_empty() -> None:
    slo = make_slo(objective=0.99, window_s=30 * 86400.0)
    lengths = burn_windows_of(slo)
    assert lengths == (300.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0, 259200.0)
    burn = {s: Counts(90, 100) for s in lengths}
    burn[300.0] = Counts(0, 0)
    status = build_status(slo, 1000.0, (0.0, 1000.0), Counts(999, 1000), burn)
    rates = status.burn_rates()
    assert set(rates) == {"5m", "30m", "1h", "2h", "6h", "1d", "3d"}
    assert isinstance(rates["5m"], NoData)
    assert rates["1h"] == pytest.approx(10.0)
    assert status.budget_remaining == pytest.approx(0.9)
    page = status.burn[0]
    assert (page.window.burn_rate, page.long.label, page.short.label) == (14.4, "1h", "5m")
    assert page.long.request_rate_per_s == pytest.approx(100 / 3600)
    assert all(not isinstance(r, float) or math.isfinite(r) for r in rates.values())


def test_windows_scaled_to_28_days_get_prometheus_duration_labels() -> None:
    slo = replace(make_slo(window_s=28 * 86400.0), alerting=Alerting(windows=workbook_windows(28 * 86400.0)))
    burn = {s: Counts(1, 1) for s in burn_windows_of(slo)}
    labels = set(build_status(slo, 0.0, (0.0, 1.0), Counts(1, 1), burn).burn_rates())
    assert {"56m", "4m40s"} <= labels


def test_a_calendar_month_spends_its_budget_in_proportion_to_the_month_elapsed() -> None:
    # 99.9 %, 10 days into a 30-day month at 3x the allowed bad share: the month's whole budget is spent
    # (burn x window / period = 3 x 10 / 30), not three times it.
    from controlplane.slo.evaluate import budget_remaining, build_status, month_share

    start = _ts(2024, 4, 1)
    assert month_share(start, _ts(2024, 4, 11)) == pytest.approx(1 / 3)
    assert month_share(_ts(2024, 2, 1), _ts(2024, 2, 15, 12)) == pytest.approx(0.5)  # a leap February
    c = Counts(1_000_000 - 3_000, 1_000_000)
    assert budget_remaining(c, 0.999, 1 / 3) == pytest.approx(0.0)
    assert budget_remaining(c, 0.999) == pytest.approx(-2.0)  # a rolling window is its own period
    slo = make_slo(objective=0.999, window_s=30 * 86400.0)
    monthly = replace(slo, window=SloWindow("calendar_month", 30 * 86400.0))
    lengths = {w for t in slo.alerting.windows for w in (t.long_s, t.short_s)}
    burn = {w: c for w in lengths}
    now = _ts(2024, 4, 11)
    assert build_status(monthly, now, (start, now), c, burn).budget_remaining == pytest.approx(0.0)
    assert build_status(slo, now, (now - 30 * 86400.0, now), c, burn).budget_remaining == pytest.approx(-2.0)
