"""The oracle behind the generated promtool tests: the SRE-workbook arithmetic, the tick-by-tick simulation that
must agree with it, and the expectations written into the test files (promtool then checks the real rules)."""

from __future__ import annotations

import re

import pytest

from controlplane import names
from controlplane.slo import oracle
from controlplane.slo.durations import parse_duration_s
from controlplane.slo.model import BurnWindow, LatencyTarget, Slo
from controlplane.slo.options import RuleOptions
from controlplane.slo.ruletests import guard_file, hold_test, plan_tier, series_values, tier_test_file
from tests.unit.slo.rule_factories import make_slo

WORKBOOK = make_slo(sli="error_rate", objective=0.999, window_days=30, min_rate=0.1)


@pytest.mark.parametrize(("tier", "fire_s", "resolve_s"), [
    (0, 51.84, 295.68), (1, 129.6, 1789.2), (2, 259.2, 7178.4), (3, 259.2, 21578.4)],
    ids=["page-14.4x-1h", "page-6x-6h", "ticket-3x-1d", "ticket-1x-3d"])
def test_at_99_9_over_30_days_the_workbook_times_follow_from_the_rule_parameters(tier: int, fire_s: float,
                                                                                 resolve_s: float) -> None:
    """SLO_AND_TUNING.md: 100% errors fire the 14.4x page after 51.8 s (0.144% of 1h), the 6x page after 129.6 s,
    the 1x ticket after 259.2 s; each resolves about one short window after the errors stop."""
    window = WORKBOOK.alerting.windows[tier]
    assert oracle.fire_after_s(WORKBOOK, window) == pytest.approx(fire_s)
    assert oracle.resolve_after_s(WORKBOOK, window) == pytest.approx(resolve_s)
    assert resolve_s == pytest.approx(window.short_s * (1 - window.burn_rate * 0.001))


@pytest.mark.parametrize("slo", [
    WORKBOOK, make_slo(objective=0.99, window_days=28, min_rate=0.1),
    make_slo(sli="goodput", objective=0.95, window_days=28, targets=(LatencyTarget("ttft", 0.5),
                                                                      LatencyTarget("tpot", 0.05))),
    make_slo(objective=0.995, windows=(BurnWindow("page", 3600, 300, 10.0, 120.0),)),
], ids=["errors-99.9-30d", "ttft-99-28d", "goodput-95-28d", "for-2m"])
def test_the_tick_by_tick_simulation_fires_and_resolves_where_the_arithmetic_says(slo: Slo) -> None:
    for window in slo.alerting.windows:
        plan = plan_tier(slo, window)
        i = plan.interval_s
        fire_tick = oracle.first_tick_above(oracle.fire_after_s(slo, window), i)
        assert plan.fires_at_s - plan.traffic.errors_from_s == fire_tick + window.for_s
        assert fire_tick - i <= oracle.fire_after_s(slo, window) < fire_tick
        resolve_tick = oracle.first_tick_at_or_after(oracle.resolve_after_s(slo, window), i)
        assert plan.resolves_at_s - plan.traffic.errors_until_s == resolve_tick
        assert plan.traffic.errors_from_s >= window.long_s  # a full long window of good traffic first


def test_the_workbook_page_test_checks_one_tick_before_and_at_52_seconds() -> None:
    window = WORKBOOK.alerting.windows[0]
    test = tier_test_file(WORKBOOK, window, "../rules/x.yaml", RuleOptions())
    assert test["evaluation_interval"] == "4s"
    case, hold = test["tests"]
    assert "the page holds" in hold["name"]  # the fastest page tier's file also carries the hold case
    assert "fires 52s after 100% errors start (workbook: burn x budget x long = 51.84 s" in case["name"]
    page = [c for c in case["alert_rule_test"] if c["alertname"] == names.ALERT_SLO_BURN_PAGE]
    times = [parse_duration_s(c["eval_time"]) - 3600 for c in page]
    fired = [{a["exp_labels"]["burn_rate"] for a in c["exp_alerts"]} for c in page]
    assert times[:2] == [48, 52] and "14.4" not in fired[0] and "14.4" in fired[1]
    assert "14.4" in fired[2] and "14.4" not in fired[3]  # one tick before / at the resolve time
    stop = 3600 + 52 + 8
    assert times[3] + 3600 - stop == oracle.first_tick_at_or_after(295.68, 4)  # 296 s: about one short window


def test_below_the_minimum_rate_the_same_errors_fire_nothing_and_above_it_they_fire() -> None:
    guards = guard_file(WORKBOOK, "../rules/x.yaml", RuleOptions())["tests"]
    below, above = guards[0], guards[1]
    assert "below the minimum" in below["name"] and "above the minimum" in above["name"]
    assert all(c["exp_alerts"] == [] for c in below["alert_rule_test"])
    fired = {a["exp_labels"]["burn_rate"] for c in above["alert_rule_test"] for a in c["exp_alerts"]}
    assert fired == {"14.4", "6", "3", "1"}  # the guard file is not vacuous: every tier fires at a higher rate


def test_the_counter_reset_case_drops_every_series_to_zero_and_expects_a_zero_ratio() -> None:
    reset = guard_file(WORKBOOK, "../rules/x.yaml", RuleOptions())["tests"][-1]
    assert "counter reset" in reset["name"]
    values = [expand(s["values"]) for s in reset["input_series"]]
    assert all(0.0 in v[1:] and v[0] > 0 for v in values)  # starts with old counts, drops to 0 mid-way
    assert all(c["exp_alerts"] == [] for c in reset["alert_rule_test"])
    assert {s["value"] for t in reset["promql_expr_test"] for s in t["exp_samples"]} == {0}


def expand(notation: str) -> list[float]:
    """promtool's 'a+bxn' expansion, to check series_values independently."""
    out: list[float] = []
    for a, sign, b, n in re.findall(r"(-?[\d.]+)([+-])([\d.]+)x(\d+)", notation):
        step = float(b) if sign == "+" else -float(b)
        out += [float(a) + k * step for k in range(int(n) + 1)]
    return out


@pytest.mark.parametrize("values", [[0, 4, 8, 8, 8, 12], [5.0], [100000, 100004, 0, 4, 8],
                                    [0.05 * k for k in range(7)]])
def test_series_notation_expands_back_to_the_samples(values: list[float]) -> None:
    assert expand(series_values(values)) == pytest.approx(values)


def test_a_short_window_without_requests_holds_a_firing_tier_and_starts_none() -> None:
    tier = WORKBOOK.alerting.windows[0]  # 14.4x over 1h / 5m
    # 100 s of errors after an hour of good traffic (the long window burns), then nothing for 10 minutes
    traffic = oracle.Traffic(1.0, 3600, 3700, pauses=((3700, 4300),))
    t = 3700 + tier.short_s + 4  # the short window holds no request
    assert traffic.window(t, tier.short_s) == (None, 0.0)
    assert traffic.window(t, tier.long_s)[0] == pytest.approx(100 / (3600 - (t - 3700)))  # above 14.4 x 0.1 %
    assert oracle.active(WORKBOOK, tier, traffic, t, firing=True)
    assert not oracle.active(WORKBOOK, tier, traffic, t, firing=False)
    # good requests again: the short window is known and clean, so the page resolves whatever it was
    assert not oracle.active(WORKBOOK, tier, traffic, 4300 + 4, firing=True)


def test_the_hold_case_expects_the_page_through_the_gap_resolved_after_and_not_restarted_by_a_second_gap() -> None:
    tier = WORKBOOK.alerting.windows[0]
    plan = plan_tier(WORKBOOK, tier)
    hold = hold_test(WORKBOOK, plan, RuleOptions())
    page = [c for c in hold["alert_rule_test"] if c["alertname"] == names.ALERT_SLO_BURN_PAGE]
    fired = ["14.4" in {a["exp_labels"]["burn_rate"] for a in c["exp_alerts"]} for c in page]
    assert fired == [True, True, True, False, False, False]
    times = [parse_duration_s(c["eval_time"]) for c in page]
    series = {s["series"]: expand(s["values"]) for s in hold["input_series"]}
    good = next(v for k, v in series.items() if 'finished_reason="stop"' in k)
    bad = next(v for k, v in series.items() if 'finished_reason="error"' in k)
    total = [g + b for g, b in zip(good, bad, strict=True)]
    i = plan.interval_s

    def at(t: float) -> float:
        return total[int(round(t / i))]

    # at the 2nd, 3rd, 5th and 6th checks no request came in the short window before them; at the 4th some did
    for t in (times[1], times[2], times[4], times[5]):
        assert at(t) == at(t - tier.short_s), t
    assert at(times[3]) > at(times[3] - tier.short_s)
    assert bad[int(round(times[1] / i))] > bad[int(round(plan.traffic.errors_from_s / i))]  # errors happened
