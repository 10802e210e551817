"""The SLO arithmetic, pure: event counts in, attainment / error budget / burn rates out.

Counting events over the whole window (never averaging per-interval ratios, Sloth #241), and an
explicit NoData when a window saw no traffic (never NaN or inf, Sloth #531). The store-facing code
(`controlplane.slo.query`) only gathers counts; every figure is derived here, from counts, so the
same functions serve the live plane, the simulator and the tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from controlplane.slo.durations import format_duration
from controlplane.slo.model import BurnWindow, Slo, SloWindow

Method = Literal["exact", "sketch", "counters"]


@dataclass(frozen=True)
class NoData:
    """No traffic (or no readings) in the window: a figure cannot be computed. Never 0, never NaN."""

    reason: str = "no requests in the window"

    def __str__(self) -> str:
        return "no data"


Figure = float | NoData


@dataclass(frozen=True)
class Counts:
    """Events of one SLI over one time range.

    good / total count known events (total = good + bad); `unknown` counts requests whose SLI value
    was NULL (neither good nor bad, excluded from total). `method` says where the numbers come from:
    "exact" (rollups + raw rows), "sketch" (an ad-hoc threshold read from the log histogram: `good` is
    an estimate inside `good_bounds`, both bounds exact), "counters" (engine counter deltas).
    """

    good: float
    total: float
    unknown: float = 0.0
    method: Method = "exact"
    good_bounds: tuple[float, float] | None = None
    # Timeslices budgeting counts slices, not requests: the known requests behind them (for the minimum
    # request rate of the alerting, which is in requests per second); None: `total` counts requests.
    requests: float | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.good <= self.total) or self.unknown < 0:
            raise ValueError(f"inconsistent counts: good={self.good} total={self.total} unknown={self.unknown}")

    @property
    def bad(self) -> float:
        return self.total - self.good

    def __add__(self, other: Counts) -> Counts:
        if "sketch" in (self.method, other.method):
            method: Method = "sketch"  # an estimate plus exact counts is still an estimate
        elif self.method == other.method:
            method = self.method
        else:
            raise ValueError(f"cannot add {self.method} counts to {other.method} counts")
        bounds = None
        if self.good_bounds is not None or other.good_bounds is not None:
            a = self.good_bounds or (self.good, self.good)
            b = other.good_bounds or (other.good, other.good)
            bounds = (a[0] + b[0], a[1] + b[1])
        requests = (None if self.requests is None and other.requests is None
                    else (self.requests or 0.0) + (other.requests or 0.0))
        return Counts(self.good + other.good, self.total + other.total, self.unknown + other.unknown, method,
                      bounds, requests)


ZERO = Counts(0, 0)


def attainment(c: Counts) -> Figure:
    """good / total over the range."""
    return NoData() if c.total <= 0 else c.good / c.total


def burn_rate(c: Counts, objective: float) -> Figure:
    """Observed bad fraction / allowed bad fraction (1 means the budget lasts exactly the period)."""
    _check_objective(objective)
    return NoData() if c.total <= 0 else (c.bad / c.total) / (1 - objective)


def budget_remaining(c: Counts, objective: float, elapsed_share: float = 1.0) -> Figure:
    """1 - burn * elapsed_share: 1 untouched, 0 spent, negative overspent (not clamped).

    Budget spent = burn * window / period. A rolling window is its period (share 1); a calendar month so far
    is `elapsed_share` of its month, and its budget is the month's: the events so far, at the rate they came,
    extended over the whole month (10 days at 3x the allowed bad share spend all of it, not three times it)."""
    _check_objective(objective)
    if not 0 < elapsed_share <= 1:
        raise ValueError(f"elapsed_share must be in (0, 1], got {elapsed_share}")
    return NoData() if c.total <= 0 else 1 - c.bad / (c.total * (1 - objective)) * elapsed_share


def month_share(start_unix_s: float, end_unix_s: float) -> float:
    """The share of the calendar month starting at `start_unix_s` (UTC) that [start, end) covers."""
    d = datetime.fromtimestamp(start_unix_s, UTC)
    nxt = datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC).timestamp()
    return min(1.0, max(end_unix_s - start_unix_s, 1e-9) / (nxt - start_unix_s))


def _check_objective(objective: float) -> None:
    if not 0 < objective < 1:
        raise ValueError(f"objective must be within (0, 1), got {objective!r}")


_EXACTNESS: dict[str, int] = {"exact": 0, "counters": 1, "sketch": 2}


def timeslice_counts(slices: Iterable[Counts], objective: float) -> Counts:
    """Timeslices budgeting: each slice with traffic is one event, good when its own attainment
    meets the objective; slices without traffic are no data and are not counted. The result is as exact as
    its least exact slice: a slice judged on a sketch estimate makes it a sketch, whose `good_bounds` count
    the slices good at either end of their own bounds."""
    good = total = lo = hi = 0
    requests = 0.0
    method: Method = "exact"
    for s in slices:
        a = attainment(s)
        if isinstance(a, NoData):
            continue
        total += 1
        good += a >= objective
        lo_good, hi_good = s.good_bounds if s.good_bounds is not None else (s.good, s.good)
        lo += lo_good / s.total >= objective
        hi += hi_good / s.total >= objective
        requests += s.total
        if _EXACTNESS[s.method] > _EXACTNESS[method]:
            method = s.method
    bounds = (float(lo), float(hi)) if method == "sketch" else None
    return Counts(good, total, requests=requests, method=method, good_bounds=bounds)


def month_start_utc(now_unix_s: float) -> float:
    """UNIX seconds of 00:00 UTC on the first day of `now`'s month."""
    d = datetime.fromtimestamp(now_unix_s, UTC)
    return datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()


def window_range(window: SloWindow, now_unix_s: float) -> tuple[float, float]:
    """[start, end) of the SLO window ending now: rolling, or the calendar month so far (UTC)."""
    if window.kind == "calendar_month":
        return month_start_utc(now_unix_s), now_unix_s
    return now_unix_s - window.duration_s, now_unix_s


def duration_label(seconds: float) -> str:
    """A window's label as Prometheus writes durations ("1h", "4m40s"), shared with the alert rules."""
    return format_duration(seconds)


@dataclass(frozen=True)
class BurnRate:
    window_s: float
    counts: Counts
    rate: Figure

    @property
    def label(self) -> str:
        return duration_label(self.window_s)

    @property
    def request_rate_per_s(self) -> float:
        """Known requests per second in the window (for the alerting's minimum request rate)."""
        c = self.counts
        return (c.total if c.requests is None else c.requests) / self.window_s


@dataclass(frozen=True)
class BurnWindowStatus:
    """One multiwindow alert tier: burn over its long and its short window, against its threshold."""

    window: BurnWindow
    long: BurnRate
    short: BurnRate


@dataclass(frozen=True)
class Quantiles:
    """Latency quantiles of one SLI (inverted-CDF definition) and the requests behind them."""

    sli: str
    count: int
    values: tuple[tuple[float, Figure], ...]  # (q, seconds)
    relative_error: float  # bound on |estimate - exact| / exact for values above 1 us


@dataclass(frozen=True)
class SloStatus:
    """Everything the plane knows about one SLO at `now`."""

    slo: Slo
    now_unix_s: float
    window_start_unix_s: float
    window_end_unix_s: float
    counts: Counts
    attainment: Figure
    budget_remaining: Figure
    burn: tuple[BurnWindowStatus, ...]
    quantiles: tuple[Quantiles, ...] = ()
    budgeting: str = "occurrences"

    def burn_rates(self) -> dict[str, Figure]:
        """Burn rate per distinct window length, keyed by its label ("5m", "1h", ...)."""
        out: dict[str, Figure] = {}
        for b in self.burn:
            for r in (b.long, b.short):
                out[r.label] = r.rate
        return out


@dataclass(frozen=True)
class AttainmentPoint:
    """One bucket of attainment over time; attainment None = no traffic in the bucket (no data)."""

    start_unix_s: float
    end_unix_s: float
    good: float
    total: float
    unknown: float
    attainment: float | None = field(default=None)


def burn_windows_of(slo: Slo) -> tuple[float, ...]:
    """Every distinct window length the SLO's alert tiers need, shortest first."""
    return tuple(sorted({s for w in slo.alerting.windows for s in (w.long_s, w.short_s)}))


def build_status(
    slo: Slo, now_unix_s: float, window: tuple[float, float], counts: Counts,
    burn_counts: Mapping[float, Counts], quantiles: tuple[Quantiles, ...] = (),
) -> SloStatus:
    """Assemble an SloStatus from the counts of the SLO window and of each burn window (by length)."""
    tiers = []
    for w in slo.alerting.windows:
        long_c, short_c = burn_counts[w.long_s], burn_counts[w.short_s]
        tiers.append(BurnWindowStatus(
            w,
            BurnRate(w.long_s, long_c, burn_rate(long_c, slo.objective)),
            BurnRate(w.short_s, short_c, burn_rate(short_c, slo.objective)),
        ))
    return SloStatus(
        slo=slo, now_unix_s=now_unix_s, window_start_unix_s=window[0], window_end_unix_s=window[1],
        counts=counts, attainment=attainment(counts),
        budget_remaining=budget_remaining(counts, slo.objective, month_share(*window)
                                          if slo.window.kind == "calendar_month" else 1.0),
        burn=tuple(tiers), quantiles=quantiles, budgeting=slo.budgeting,
    )


def point(start: float, end: float, c: Counts) -> AttainmentPoint:
    a = attainment(c)
    return AttainmentPoint(start, end, c.good, c.total, c.unknown, None if isinstance(a, NoData) else a)
