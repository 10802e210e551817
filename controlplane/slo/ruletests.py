"""promtool unit tests for the burn-rate rules, generated from the same SLOs so they follow the rule parameters.

For each SLO and tier: one long window of good traffic, then 100% bad requests until just after the tier fires,
then good traffic until just after it resolves. The expected fire and resolve times come from the workbook
arithmetic (oracle.py), rounded up to promtool's evaluation ticks; every other tier's state at those ticks is
checked too. The fastest page tier's file also shows a firing page holding while no request finishes in its short
window, and resolving on the first good requests after. Per SLO, a guard file shows: nothing fires below the
minimum request rate (and the same errors above it do fire), zero traffic records no ratio (no NaN), and a counter
reset fires nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controlplane import names
from controlplane.slo import oracle
from controlplane.slo.durations import format_duration
from controlplane.slo.model import BurnWindow, Slo
from controlplane.slo.options import RuleOptions
from controlplane.slo.promql import Matcher, Selector
from controlplane.slo.rules import HISTOGRAMS, burn_alert, live_tiers, recording_rules, snap_to_edge, windows_of

# promtool spends ~0.1 ms per rule per evaluation step whatever the data; steps x rules per test is its cost.
MAX_RULE_EVALS = 20_000
MIN_MARGIN = 1e-6  # relative distance from a threshold below which a tick counts as a tie


def _fmt(seconds: float) -> str:
    return format_duration(seconds) if seconds > 0 else "0s"


def series_values(values: Sequence[float]) -> str:
    """promtool's expanding notation ("a+bxn", n+1 values) for a list of samples, one segment per constant step."""
    out, k = [], 0
    while k < len(values):
        step = values[k + 1] - values[k] if k + 1 < len(values) else 0.0
        n = 0
        while k + n + 1 < len(values) and math.isclose(values[k + n + 1] - values[k + n], step, abs_tol=1e-9):
            n += 1
        out.append(f"{_num(values[k])}{'+' if step >= 0 else '-'}{_num(abs(step))}x{n}")
        k += n + 1
    return " ".join(out)


def _num(v: float) -> str:
    return repr(int(v)) if float(v).is_integer() else repr(round(v, 9))


def _series(metric: str, labels: dict[str, str], values: Sequence[float]) -> dict[str, str]:
    sel = Selector(metric, tuple(Matcher(k, v) for k, v in labels.items()))
    return {"series": sel.render(), "values": series_values(values)}


def input_series(slo: Slo, good: Sequence[float], bad: Sequence[float]) -> list[dict[str, str]]:
    """vLLM series for cumulative good / bad request counts; goodput makes its first target the bad one."""
    base = {names.LABEL_DEPLOYMENT: slo.deployment, "model_name": slo.deployment, "instance": "replica-0"}
    if slo.sli == "error_rate":
        return [_series(names.VLLM_REQUEST_SUCCESS_TOTAL, {**base, names.LABEL_FINISHED_REASON: "stop"}, good),
                _series(names.VLLM_REQUEST_SUCCESS_TOTAL, {**base, names.LABEL_FINISHED_REASON: "error"}, bad)]
    out = []
    for i, target in enumerate(slo.targets):
        metric, _ = HISTOGRAMS[target.sli]
        edge, _ = snap_to_edge(target)
        le = repr(float(edge))  # as prometheus_client writes it: "0.5", "1.0"
        count = [g + b for g, b in zip(good, bad, strict=True)]
        out.append(_series(f"{metric}_count", base, count))
        out.append(_series(f"{metric}_bucket", {**base, names.LABEL_LE: le}, good if i == 0 else count))
    return out


def _traffic_series(slo: Slo, traffic: oracle.Traffic, interval_s: float, end_s: float) -> list[dict[str, str]]:
    ticks = [k * interval_s for k in range(int(round(end_s / interval_s)) + 1)]
    bad = [traffic.bad(t) for t in ticks]
    return input_series(slo, [traffic.total(t) - b for t, b in zip(ticks, bad, strict=True)], bad)


def _expected(slo: Slo, firing: Sequence[BurnWindow], options: RuleOptions) -> list[dict[str, Any]]:
    out = []
    for tier in firing:
        rule = burn_alert(slo, tier, options)
        out.append({"exp_labels": dict(rule.labels), "exp_annotations": dict(rule.annotations)})
    return out


def _alert_checks(slo: Slo, tiers: Sequence[BurnWindow], states: dict[BurnWindow, list[bool]] | None,
                  times: Sequence[float], interval_s: float, options: RuleOptions) -> list[dict[str, Any]]:
    """At each time, for the page and the ticket alert: exactly the tiers `states` says fire (None: none)."""
    checks = []
    for t in sorted(set(times)):
        k = int(round(t / interval_s))
        for severity, alert in (("page", names.ALERT_SLO_BURN_PAGE), ("ticket", names.ALERT_SLO_BURN_TICKET)):
            firing = [w for w in tiers if w.severity == severity and states is not None and states[w][k]]
            checks.append({"eval_time": _fmt(t), "alertname": alert, "exp_alerts": _expected(slo, firing, options)})
    return checks


def eval_intervals(windows: Sequence[float], span_s: float, n_rules: int) -> list[float]:
    """Evaluation intervals that divide every window (so ranges start on a sample) and keep the test cheap."""
    whole = [int(round(w)) for w in windows]
    if any(not math.isclose(w, x) for w, x in zip(windows, whole, strict=True)):
        raise ValueError(f"generated tests need whole-second windows, got {windows}")
    g = math.gcd(*whole)
    cheap = [float(d) for d in range(1, g + 1) if g % d == 0 and (span_s / d + 1) * n_rules <= MAX_RULE_EVALS]
    return cheap or [float(g)]  # the windows allow nothing coarser than their gcd


def n_rules(slo: Slo) -> int:
    tiers, _ = live_tiers(slo)
    return len(recording_rules(slo, windows_of(tiers))) + len(tiers)


def tier_signature(slo: Slo) -> tuple[object, ...]:
    """What the tier tests of an SLO depend on: the tier arithmetic and the shape of the rules (histogram,
    counter, or per-target). Two SLOs with one signature differ only in metric names and bucket edges, which
    their guard files exercise; tier files are generated for the first of them only (promtool time adds up)."""
    family = "histogram" if slo.sli not in ("error_rate", "goodput") else slo.sli
    return (family, slo.objective, slo.alerting.min_request_rate_per_s, tuple(live_tiers(slo)[0]),
            slo.alerting.keep_firing_s())


@dataclass(frozen=True)
class TierPlan:
    """One tier's scenario and what the workbook says about it."""

    tier: BurnWindow
    interval_s: float
    traffic: oracle.Traffic
    end_s: float
    fires_at_s: float  # evaluation time the tier first fires (errors start at traffic.errors_from_s)
    resolves_at_s: float  # first evaluation it no longer fires (errors stopped at traffic.errors_until_s)
    states: dict[BurnWindow, list[bool]]


def traffic_rate(slo: Slo) -> float:
    """Above the SLO's minimum request rate (1 request/s unless the minimum is higher)."""
    return max(1.0, 2 * slo.alerting.min_request_rate_per_s)


def plan_tier(slo: Slo, tier: BurnWindow) -> TierPlan:
    tiers, _ = live_tiers(slo)
    fire_s, resolve_s = oracle.fire_after_s(slo, tier), oracle.resolve_after_s(slo, tier)
    keep = slo.alerting.keep_firing_s()
    span = tier.long_s + fire_s + tier.for_s + tier.short_s + 10 * tier.short_s / 12 + keep
    for i in eval_intervals(windows_of(tiers) + [d for d in (tier.for_s, keep) if d], span, n_rules(slo)):
        start = tier.long_s
        fires = start + oracle.first_tick_above(fire_s, i) + tier.for_s
        stop = fires + 2 * i
        resolves = stop + oracle.first_tick_at_or_after(resolve_s, i) + oracle.keep_after_s(slo, i)
        traffic = oracle.Traffic(traffic_rate(slo), start, stop)
        end = resolves + 2 * i
        states = {w: oracle.firing_ticks(slo, w, traffic, i, end) for w in tiers}
        got = oracle.transitions(states[tier], i)
        if (got.fires_at_s, got.resolves_at_s) != (fires, resolves):
            raise AssertionError(f"{slo.name}: simulation {got} disagrees with the workbook ({fires}, {resolves})")
        checks = (fires - i, fires, resolves - i, resolves)
        if all(oracle.margin(slo, w, traffic, t) > MIN_MARGIN for w in tiers for t in checks):
            return TierPlan(tier, i, traffic, end, fires, resolves, states)
    raise ValueError(f"{slo.name}: no evaluation interval gives tie-free checks for tier {tier}")


def tier_test_file(slo: Slo, tier: BurnWindow, rule_file: str, options: RuleOptions) -> dict[str, Any]:
    p = plan_tier(slo, tier)
    tiers, _ = live_tiers(slo)
    start, stop = p.traffic.errors_from_s, p.traffic.errors_until_s
    name = (f"{slo.name} {tier.severity} {tier.burn_rate:g}x over {_fmt(tier.long_s)}/{_fmt(tier.short_s)}: "
            f"fires {_fmt(p.fires_at_s - start)} after 100% errors start (workbook: burn x budget x long = "
            f"{oracle.fire_after_s(slo, tier):.6g} s + for {tier.for_s:g} s, next {p.interval_s:g} s tick), resolves "
            f"{_fmt(p.resolves_at_s - stop)} after they stop (workbook: short x (1 - burn x budget) = "
            f"{oracle.resolve_after_s(slo, tier):.6g} s, then keep_firing_for "
            f"{_fmt(slo.alerting.keep_firing_s())})")
    checks = (p.fires_at_s - p.interval_s, p.fires_at_s, p.resolves_at_s - p.interval_s, p.resolves_at_s)
    tests = [{
        "name": name,
        "interval": _fmt(p.interval_s),
        "input_series": _traffic_series(slo, p.traffic, p.interval_s, p.end_s),
        "alert_rule_test": _alert_checks(slo, tiers, p.states, checks, p.interval_s, options),
    }]
    if tier == fastest_page(slo):  # the hold, once per SLO, where the evaluation interval is short
        tests.append(hold_test(slo, p, options))
    return {"rule_files": [rule_file], "evaluation_interval": _fmt(p.interval_s), "tests": tests}


# Prometheus's default lookback: the rules read their alert's ALERTS sample from the previous evaluation.
LOOKBACK_S = 300.0


def fastest_page(slo: Slo) -> BurnWindow | None:
    pages = [t for t in live_tiers(slo)[0] if t.severity == "page"]
    return min(pages, key=lambda t: t.long_s) if pages else None


def hold_test(slo: Slo, p: TierPlan, options: RuleOptions) -> dict[str, Any]:
    """The page fires, then no request arrives for more than a short window (a hung engine, a backlog in which
    nothing finishes): the page holds; the first good requests after it resolve it. Then a second gap while the
    long window still burns: a page that is not firing is not started by it."""
    tiers, _ = live_tiers(slo)
    i, tier = p.interval_s, p.tier
    if i >= LOOKBACK_S:
        raise ValueError(f"{slo.name}: a hold test needs an evaluation interval under {LOOKBACK_S:g} s, got {i:g} s")
    kept = oracle.keep_after_s(slo, i)  # the page resolves this long after the first good requests clear it
    gap = tier.short_s + kept + 4 * i  # longer than keep_firing_for: without the hold, the gap would resolve it
    first = (p.fires_at_s + i, p.fires_at_s + i + gap)
    second = (first[1] + 2 * i + kept, first[1] + 2 * i + kept + gap)
    traffic = oracle.Traffic(traffic_rate(slo), p.traffic.errors_from_s, first[0], (first, second))
    end = second[1] + 2 * i
    states = {w: oracle.firing_ticks(slo, w, traffic, i, end) for w in tiers}
    checks = (p.fires_at_s, first[0] + tier.short_s + i, first[1], *((first[1] + i,) if kept else ()),
              first[1] + i + kept, second[0] + tier.short_s + i, second[1])
    expected = [True, True, True, *((True,) if kept else ()), False, False, False]
    thr = oracle.threshold(slo, tier)
    if not all((traffic.window(t, tier.long_s)[0] or 0.0) > thr for t in checks[1:]):  # the premise, first
        raise ValueError(f"{slo.name}: the long window stops burning during the hold test; the gaps prove nothing")
    if [states[tier][int(round(t / i))] for t in checks] != expected:
        raise AssertionError(f"{slo.name}: the simulation does not hold, resolve and stay resolved: {states[tier]}")
    if any(oracle.margin(slo, w, traffic, t) <= MIN_MARGIN for w in tiers for t in checks):
        raise ValueError(f"{slo.name}: the hold test's checks fall on a threshold tie at interval {i:g} s")
    return {
        "name": f"{slo.name} {tier.severity} {tier.burn_rate:g}x over {_fmt(tier.long_s)}/{_fmt(tier.short_s)}: "
                f"fires, then no request for {_fmt(gap)} (over a short window): the page holds; the first good "
                f"requests clear it (resolved {_fmt(kept)} later, keep_firing_for); a second gap while the long "
                f"window still burns does not start it again",
        "interval": _fmt(i),
        "input_series": _traffic_series(slo, traffic, i, end),
        "alert_rule_test": _alert_checks(slo, tiers, states, checks, i, options),
    }


def guard_file(slo: Slo, rule_file: str, options: RuleOptions) -> dict[str, Any]:
    """Minimum request rate (below: silent; above: fires), zero traffic (no ratio, no NaN), counter reset."""
    tiers, _ = live_tiers(slo)
    longest, shortest = max(t.long_s for t in tiers), min(t.short_s for t in tiers)
    worst_fire = max(oracle.fire_after_s(slo, t) + t.for_s for t in tiers)
    span = longest + worst_fire + 2 * shortest
    interval = eval_intervals(windows_of(tiers) + [t.for_s for t in tiers if t.for_s], span, n_rules(slo))[0]
    tests = []
    if slo.alerting.min_request_rate_per_s > 0:
        start = longest
        end = start + oracle.first_tick_above(worst_fire, interval) + 2 * interval
        times = sorted({start + oracle.first_tick_above(oracle.fire_after_s(slo, t), interval) + t.for_s
                        for t in tiers} | {end})
        for label, rate in (("below", slo.alerting.min_request_rate_per_s / 2), ("above", traffic_rate(slo))):
            traffic = oracle.Traffic(rate, start, end)
            states = {w: oracle.firing_ticks(slo, w, traffic, interval, end) for w in tiers}
            tests.append({
                "name": f"{slo.name}: 100% errors at {rate:g} requests/s, {label} the minimum of "
                        f"{slo.alerting.min_request_rate_per_s:g}/s, {'fire nothing' if label == 'below' else 'fire'}",
                "interval": _fmt(interval),
                "input_series": _traffic_series(slo, traffic, interval, end),
                "alert_rule_test": _alert_checks(slo, tiers, states, times, interval, options),
            })
    n_zero = int(round(2 * longest / 12 / interval))
    zero_end = n_zero * interval
    own = {names.LABEL_SLO: slo.name, names.LABEL_DEPLOYMENT: slo.deployment}
    tests.append({
        "name": f"{slo.name}: zero traffic records no error ratio (not NaN) and fires nothing",
        "interval": _fmt(interval),
        "input_series": input_series(slo, [0.0] * (n_zero + 1), [0.0] * (n_zero + 1)),
        "alert_rule_test": _alert_checks(slo, tiers, None, [shortest, zero_end], interval, options),
        "promql_expr_test": [
            {"expr": _sel(names.REC_SLO_ERROR_RATIO + _fmt(shortest), slo), "eval_time": _fmt(zero_end),
             "exp_samples": []},
            {"expr": _sel(names.REC_SLO_REQUESTS_RATE + _fmt(shortest), slo), "eval_time": _fmt(zero_end),
             "exp_samples": [{"labels": Selector(names.REC_SLO_REQUESTS_RATE + _fmt(shortest),
                                                 tuple(Matcher(k, v) for k, v in own.items())).render(),
                              "value": 0}]},
        ],
    })
    tests.append(_reset_test(slo, tiers, shortest, interval, options))
    return {"rule_files": [rule_file], "evaluation_interval": _fmt(interval), "tests": tests}


def _reset_test(slo: Slo, tiers: Sequence[BurnWindow], shortest: float, interval: float,
                options: RuleOptions) -> dict[str, Any]:
    """Good traffic on counters that carry old errors (offsets), dropping to 0 mid-way: rate() sees a reset,
    so bad/total stays 0; a rule that subtracted the raw counters before rating would read the drop as errors."""
    step = int(round(interval * traffic_rate(slo)))
    reset_k = int(round(4 * shortest / interval))
    n = 2 * reset_k
    good = [100_000.0 + step * k if k < reset_k else float(step * (k - reset_k)) for k in range(n + 1)]
    bad = [1_000.0 if k < reset_k else 0.0 for k in range(n + 1)]
    after = (reset_k + 1) * interval
    return {
        "name": f"{slo.name}: a counter reset (every series drops to 0) fires nothing and keeps the ratio at 0",
        "interval": _fmt(interval),
        "input_series": input_series(slo, good, bad),
        "alert_rule_test": _alert_checks(slo, tiers, None, [after, reset_k * interval + shortest, n * interval],
                                         interval, options),
        "promql_expr_test": [
            {"expr": _sel(names.REC_SLO_ERROR_RATIO + _fmt(w), slo), "eval_time": _fmt(after),
             "exp_samples": [{"labels": Selector(names.REC_SLO_ERROR_RATIO + _fmt(w), (
                 Matcher(names.LABEL_DEPLOYMENT, slo.deployment), Matcher(names.LABEL_SLO, slo.name))).render(),
                 "value": 0}]}
            for w in windows_of(tiers)
        ],
    }


def _sel(record: str, slo: Slo) -> str:
    return Selector(record, (Matcher(names.LABEL_SLO, slo.name),)).render()
