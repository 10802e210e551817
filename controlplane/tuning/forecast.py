"""Request-rate forecast for the autoscaler: a fast level, a robust trend, and a margin learned from past misses.

Three signals because one smoother cannot do all three jobs. The level (EWMA of the per-interval rate) must
follow a burst within an interval or two. The trend must be fooled neither by counting noise nor by a step (a
burst is not a ramp; extrapolating it over a replica's start-up buys replicas the burst never needs): it is the
Theil-Sen slope (median of pairwise slopes) over the last `trend_window_s`, and only a rise counts. On a ramp
every pair agrees; across a step at most half the pairs straddle it, so the median stays near zero. The margin is
what such forecasts missed before: over past points, how far the load sustained over `sustain_s` rose above
the forecast made at that point, within one lead time; the `surge_quantile` of the misses seen at levels like
today's is added to the next forecast, up to the highest load the history sustained plus the trend's rise.
So a load that bursts has its bursts provisioned for from its lulls, never above their height, and a load that
ramps smoothly costs nothing extra. The price: a load accelerating past its old high (a ramp that steepens)
gets no margin beyond its trend's rise, so it can be under-forecast by its acceleration over one lead time;
the autoscaler's observed-SLO-risk path covers that. Unknown readings are skipped: they neither move the level
nor count as zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MIN_NEIGHBOURS = 8


@dataclass(frozen=True)
class ForecastConfig:
    level_alpha: float = 0.5
    trend_window_s: float = 600.0
    sustain_s: float = 60.0  # a load must last this long to count as a surge (shorter ones queue)
    surge_quantile: float = 0.95
    neighbours: float = 0.25  # the margin learns from this share of past points, those nearest today's level
    peak_slack: float = 0.05  # the margin stops this far above the history's peak (plus the trend's rise)
    history_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.level_alpha <= 1 or not 0 < self.surge_quantile < 1 or not 0 < self.neighbours <= 1:
            raise ValueError(f"forecast: level_alpha and neighbours must be in (0, 1], surge_quantile in (0, 1); got "
                             f"{self.level_alpha}, {self.neighbours} and {self.surge_quantile}")
        if self.trend_window_s <= 0 or self.sustain_s <= 0 or self.history_s <= 0:
            raise ValueError("forecast: trend_window_s, sustain_s and history_s must be > 0")


# One known reading and the forecast made right after it: (ts, rate, level, rising slope per s).
Point = tuple[float, float, float, float]


@dataclass(frozen=True)
class ForecastState:
    level_rps: float | None = None
    history: tuple[Point, ...] = ()


@dataclass(frozen=True)
class Forecast:
    level_rps: float
    slope_rps_per_s: float  # rising trend (0 when flat or falling)
    base_rps: float  # level + trend over the lead time
    margin_rps: float  # learned from past misses

    @property
    def load_rps(self) -> float:
        return self.base_rps + self.margin_rps


def _slope(t: np.ndarray, r: np.ndarray) -> float:
    """Theil-Sen slope (by hand: numpy has none, and scipy is not a dependency); flat under 3 points."""
    if len(t) < 3:
        return 0.0
    i, j = np.triu_indices(len(t), k=1)
    dt = t[j] - t[i]
    ok = dt > 0
    return float(np.median((r[j] - r[i])[ok] / dt[ok])) if ok.any() else 0.0


def _predicted(p: Point, at: np.ndarray) -> np.ndarray:
    return p[2] + p[3] * (at - p[0])


def _sustained(t: np.ndarray, rate: np.ndarray, sustain_s: float) -> np.ndarray:
    """Each point's mean rate over (t - sustain_s, t]."""
    csum = np.concatenate(([0.0], np.cumsum(rate)))
    first = np.searchsorted(t, t - sustain_s, side="right")
    out: np.ndarray = (csum[1:] - csum[first]) / (np.arange(1, len(t) + 1) - first)
    return out


def margin(history: tuple[Point, ...], sustained: np.ndarray, lead_s: float, q: float, neighbours: float) -> float:
    """The q-quantile of past misses at the points whose level was nearest the current one (the nearest
    `neighbours` share of them): a surge is likely from a lull, not from the top of a burst. 0 until one full
    lead time of history exists. `sustained`: each point's rate sustained over `sustain_s` (`_sustained`)."""
    if len(history) < 3:
        return 0.0
    h = np.asarray(history)
    t, level = h[:, 0], h[:, 2]
    misses, levels = [], []
    for i, p in enumerate(history):
        if t[-1] < p[0] + lead_s:
            break  # the lead time after this point has not fully happened yet
        hi = int(np.searchsorted(t, p[0] + lead_s, side="right"))
        if hi <= i + 1:
            continue
        misses.append(max(0.0, float(np.max(sustained[i + 1:hi] - _predicted(p, t[i + 1:hi])))))
        levels.append(level[i])
    if not misses:
        return 0.0
    k = max(_MIN_NEIGHBOURS, math.ceil(neighbours * len(misses)))
    nearest = np.argsort(np.abs(np.asarray(levels) - level[-1]), kind="stable")[:k]
    return float(np.quantile(np.asarray(misses)[nearest], q))


def step(state: ForecastState, rate: float | None, now: float, lead_s: float,
         cfg: ForecastConfig) -> tuple[ForecastState, Forecast | None]:
    """Fold in a reading (None: unknown, skipped) and forecast the load over the next `lead_s`."""
    if rate is not None:
        level = rate if state.level_rps is None else cfg.level_alpha * rate + (1 - cfg.level_alpha) * state.level_rps
        kept = tuple(p for p in state.history if p[0] > now - cfg.history_s)
        pts = [(p[0], p[1]) for p in kept if p[0] > now - cfg.trend_window_s] + [(now, rate)]
        arr = np.asarray(pts)
        slope = max(0.0, _slope(arr[:, 0], arr[:, 1]))
        state = ForecastState(level, kept + ((now, rate, level, slope),))
    if state.level_rps is None or not state.history:
        return state, None
    last = state.history[-1]
    base = float(_predicted(last, np.asarray([last[0] + lead_s]))[0])
    h = np.asarray(state.history)
    sustained = _sustained(h[:, 0], h[:, 1], cfg.sustain_s)
    extra = margin(state.history, sustained, lead_s, cfg.surge_quantile, cfg.neighbours)
    # The margin stops at the highest load the history sustained, raised by what the trend adds over the lead
    # time: bursts recur at their height, not above it, and a rising load may pass its old high only as fast as
    # it rises. (Dropping the cap whenever the trend was above zero let a slope of noise, 0.005 req/s per s in a
    # lull between bursts, add a 50 req/s margin over a 100 req/s peak: 43 replicas where 38 had served it.)
    peak = float(sustained.max()) * (1 + cfg.peak_slack) + last[3] * lead_s
    extra = max(0.0, min(extra, peak - base))
    return state, Forecast(last[2], last[3], base, extra)
