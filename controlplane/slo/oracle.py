"""The SRE-workbook arithmetic of burn-rate alerts, as an oracle for the generated promtool tests.

Closed forms (100% bad requests starting after at least one long window of good traffic, constant rate):
  a tier fires   burn * budget * long   seconds after the errors start  (99.9%, 1h, 14.4x: 51.84 s)
  it resolves    short * (1 - burn * budget)  seconds after they stop    (about one short window)
The simulation below evaluates the same windows tick by tick, the way Prometheus 2.x does on promtool's aligned
samples (a range [t - w, t] holds samples at both ends, so rate() = (v(t) - v(t - w)) / w with no extrapolation;
ranges reaching before the first sample start at it, since counters starting at 0 are not extrapolated).
Tests assert that the closed forms and the simulation agree; promtool then checks the real rules against both.

A window in which no request finished has no ratio: it is unknown, and holds a firing alert as it is (the rules'
second branch, on the alert's own ALERTS series); it never starts one. `Traffic.pauses` model it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from controlplane.slo.model import BurnWindow, Slo


@dataclass(frozen=True)
class Traffic:
    """Constant request rate; every request in (errors_from_s, errors_until_s] is bad, all others good; none
    arrives in a pause (from, until] (pauses do not overlap)."""

    rate_per_s: float
    errors_from_s: float
    errors_until_s: float
    pauses: tuple[tuple[float, float], ...] = ()

    def _requests(self, a: float, b: float) -> float:
        """Requests in (a, b], none in the pauses."""
        span = max(0.0, b - a)
        for lo, hi in self.pauses:
            span -= max(0.0, min(b, hi) - max(a, lo))
        return self.rate_per_s * span

    def total(self, t: float) -> float:
        return self._requests(0.0, t)

    def bad(self, t: float) -> float:
        return self._requests(self.errors_from_s, min(t, self.errors_until_s))

    def window(self, t: float, w: float) -> tuple[float | None, float]:
        """(bad fraction or None when there was no traffic, requests/s) over the window ending at t."""
        start = max(0.0, t - w)
        total = self.total(t) - self.total(start)
        ratio = (self.bad(t) - self.bad(start)) / total if total > 0 else None
        return ratio, total / w


def fire_after_s(slo: Slo, tier: BurnWindow) -> float:
    """Seconds of 100% errors until the long window's bad fraction exceeds burn * budget (before `for`)."""
    return tier.burn_rate * slo.error_budget_ratio * tier.long_s


def resolve_after_s(slo: Slo, tier: BurnWindow) -> float:
    """Seconds after the errors stop until the short window's bad fraction is back at or below burn * budget."""
    return tier.short_s * (1 - tier.burn_rate * slo.error_budget_ratio)


def first_tick_above(seconds: float, interval_s: float) -> float:
    """The first evaluation (a multiple of the interval) strictly after `seconds`."""
    return (math.floor(seconds / interval_s) + 1) * interval_s


def first_tick_at_or_after(seconds: float, interval_s: float) -> float:
    return math.ceil(seconds / interval_s - 1e-12) * interval_s


def threshold(slo: Slo, tier: BurnWindow) -> float:
    """Same float as the rule's `burn * (1 - objective)`."""
    return tier.burn_rate * (1 - slo.objective)


def active(slo: Slo, tier: BurnWindow, traffic: Traffic, t: float, firing: bool = False) -> bool:
    """The alert expression of one tier at time t: both windows burn and the long window has enough traffic; or
    the alert was firing at the last evaluation (`firing`), the long window still burns with enough traffic, and
    no request finished in the short window (unknown: it holds)."""
    thr = threshold(slo, tier)
    long_ratio, long_rate = traffic.window(t, tier.long_s)
    short_ratio, _ = traffic.window(t, tier.short_s)
    if long_ratio is None or not (long_ratio > thr and long_rate >= slo.alerting.min_request_rate_per_s):
        return False
    return firing if short_ratio is None else short_ratio > thr


def margin(slo: Slo, tier: BurnWindow, traffic: Traffic, t: float) -> float:
    """Smallest relative distance of a window ratio from the threshold at t: a tie would make the outcome depend
    on float rounding, so generated tests avoid ticks where this is tiny."""
    thr = threshold(slo, tier)
    out = math.inf
    for w in (tier.long_s, tier.short_s):
        ratio, _ = traffic.window(t, w)
        if ratio is not None:
            out = min(out, abs(ratio - thr) / thr)
    long_rate = traffic.window(t, tier.long_s)[1]
    if slo.alerting.min_request_rate_per_s > 0:
        out = min(out, abs(long_rate - slo.alerting.min_request_rate_per_s) / slo.alerting.min_request_rate_per_s)
    return out


def firing_ticks(slo: Slo, tier: BurnWindow, traffic: Traffic, interval_s: float, end_s: float) -> list[bool]:
    """Firing state at every evaluation 0, i, 2i, ... end (Prometheus: pending until active for `for`; a firing
    alert whose expression clears keeps firing until `keep_firing_for` has passed since the first clear tick)."""
    states: list[bool] = []
    active_since = clear_since = None
    keep = slo.alerting.keep_firing_s()
    for k in range(int(round(end_s / interval_s)) + 1):
        t = k * interval_s
        firing = bool(states) and states[-1]
        if active(slo, tier, traffic, t, firing=firing):
            active_since = t if active_since is None else active_since
            clear_since = None
            states.append(t - active_since >= tier.for_s)
        elif firing and t - (clear_since := t if clear_since is None else clear_since) < keep:
            states.append(True)
        else:
            active_since = clear_since = None
            states.append(False)
    return states


def keep_after_s(slo: Slo, interval_s: float) -> float:
    """How long after its first clear evaluation a firing alert resolves: keep_firing_for, to the next tick."""
    return first_tick_at_or_after(slo.alerting.keep_firing_s(), interval_s)


@dataclass(frozen=True)
class Transitions:
    fires_at_s: float | None  # first evaluation where the tier fires
    resolves_at_s: float | None  # first evaluation after that where it no longer fires


def transitions(states: list[bool], interval_s: float) -> Transitions:
    fire = next((k for k, s in enumerate(states) if s), None)
    if fire is None:
        return Transitions(None, None)
    resolve = next((k for k in range(fire, len(states)) if not states[k]), None)
    return Transitions(fire * interval_s, None if resolve is None else resolve * interval_s)
