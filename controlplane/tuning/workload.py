"""Request streams for the simulator: synthetic (seeded) or replayed from the store's `requests` table.

A workload is three arrays: arrival times (seconds from its start), prompt tokens and output tokens
per request. Output lengths are what the request will generate (as with `ignore_eos`): a replayed
trace uses the completion tokens each request actually produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from controlplane.store.repo import Store

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
MAX_LENGTH = 100_000_000  # a sampled length is clipped here, far past any model's context, before its int64 cast


@dataclass(frozen=True, eq=False)
class Workload:
    arrival_s: FloatArray
    prompt_tokens: IntArray
    output_tokens: IntArray
    name: str = "workload"
    skipped_rows: int = 0  # trace rows left out because a token count was unknown

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError(f"workload {self.name!r}: arrival_s, prompt_tokens and output_tokens differ in length "
                             f"({n}, {len(self.prompt_tokens)}, {len(self.output_tokens)})")
        if n and (np.any(np.diff(self.arrival_s) < 0) or self.arrival_s[0] < 0):
            raise ValueError(f"workload {self.name!r}: arrival times must be >= 0 and ascending")
        if n and (self.prompt_tokens.min() < 1 or self.output_tokens.min() < 1):
            raise ValueError(f"workload {self.name!r}: every request needs >= 1 prompt and >= 1 output token")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def head(self, n: int) -> Workload:
        return Workload(self.arrival_s[:n], self.prompt_tokens[:n], self.output_tokens[:n], self.name)


# --- length distributions ---------------------------------------------------------------------
@dataclass(frozen=True)
class Fixed:
    tokens: int


@dataclass(frozen=True)
class Uniform:
    low: int
    high: int  # inclusive


@dataclass(frozen=True)
class LogNormal:
    """Lengths whose log is normal: `median` tokens, `sigma` the log's standard deviation, clipped."""

    median: float
    sigma: float
    low: int = 1
    high: int | None = None


@dataclass(frozen=True)
class Empirical:
    """Resample (with replacement) the lengths a recorded trace had."""

    values: tuple[int, ...]


LengthDist = Fixed | Uniform | LogNormal | Empirical


def sample_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> IntArray:
    if isinstance(dist, Fixed):
        if dist.tokens < 1:
            raise ValueError(f"Fixed length must be >= 1 token, got {dist.tokens}")
        return np.full(n, dist.tokens, dtype=np.int64)
    if isinstance(dist, Uniform):
        if not 1 <= dist.low <= dist.high:
            raise ValueError(f"Uniform lengths need 1 <= low <= high, got low={dist.low} high={dist.high}")
        return rng.integers(dist.low, dist.high + 1, size=n, dtype=np.int64)
    if isinstance(dist, LogNormal):
        if dist.median <= 0 or dist.sigma < 0 or dist.low < 1 or (dist.high is not None and dist.high < dist.low):
            raise ValueError(f"LogNormal lengths need median > 0, sigma >= 0, 1 <= low <= high; got {dist}")
        raw = np.rint(rng.lognormal(np.log(dist.median), dist.sigma, size=n))
        # Clipped before the cast: a wide tail overflows int64 (or is inf), which would read as a length of < 1.
        return np.clip(raw, dist.low, dist.high if dist.high is not None else MAX_LENGTH).astype(np.int64)
    if not dist.values or min(dist.values) < 1:
        raise ValueError("Empirical lengths need at least one value, all >= 1")
    return rng.choice(np.asarray(dist.values, dtype=np.int64), size=n, replace=True)


# --- arrival processes --------------------------------------------------------------------------
@dataclass(frozen=True)
class Poisson:
    rate_rps: float


@dataclass(frozen=True)
class OnOff:
    """A two-state Markov-modulated Poisson process: bursts at `on_rps`, lulls at `off_rps`, with
    exponentially distributed sojourns of mean `mean_on_s` / `mean_off_s`. Starts in a burst."""

    on_rps: float
    off_rps: float
    mean_on_s: float
    mean_off_s: float

    @property
    def mean_rps(self) -> float:
        return (self.on_rps * self.mean_on_s + self.off_rps * self.mean_off_s) / (self.mean_on_s + self.mean_off_s)


@dataclass(frozen=True)
class Diurnal:
    """Poisson with rate mean_rps * (1 + amplitude * sin(2 pi t / period_s + phase))."""

    mean_rps: float
    amplitude: float
    period_s: float = 86_400.0
    phase: float = 0.0


Arrivals = Poisson | OnOff | Diurnal


def _check_process(p: Arrivals) -> None:
    if isinstance(p, Poisson) and p.rate_rps <= 0:
        raise ValueError(f"Poisson rate must be > 0 requests/s, got {p.rate_rps}")
    if isinstance(p, OnOff) and (p.on_rps < 0 or p.off_rps < 0 or p.on_rps + p.off_rps <= 0
                                 or p.mean_on_s <= 0 or p.mean_off_s <= 0):
        raise ValueError(f"OnOff needs rates >= 0 (not both 0) and mean sojourns > 0, got {p}")
    if isinstance(p, Diurnal) and (p.mean_rps <= 0 or not 0 <= p.amplitude <= 1 or p.period_s <= 0):
        raise ValueError(f"Diurnal needs mean_rps > 0, 0 <= amplitude <= 1, period_s > 0, got {p}")


def _poisson_times(rate: float, start: float, end: float, rng: np.random.Generator) -> FloatArray:
    count = rng.poisson(rate * (end - start))
    return np.sort(rng.uniform(start, end, size=count))


def _times_until(process: Arrivals, end: float, rng: np.random.Generator) -> FloatArray:
    """All arrivals in [0, end)."""
    if isinstance(process, Poisson):
        return _poisson_times(process.rate_rps, 0.0, end, rng)
    if isinstance(process, Diurnal):  # thinning (Lewis-Shedler) against the peak rate
        peak = process.mean_rps * (1 + process.amplitude)
        cand = _poisson_times(peak, 0.0, end, rng)
        rate = process.mean_rps * (1 + process.amplitude * np.sin(2 * np.pi * cand / process.period_s
                                                                  + process.phase))
        return cand[rng.uniform(0, peak, size=len(cand)) < rate]
    # On/off: alternate exponential sojourns (burst first), then a Poisson count in each, all vectorised.
    mean_cycle = process.mean_on_s + process.mean_off_s
    k = int(2 * end / mean_cycle) + 16
    while True:
        means = np.where(np.arange(2 * k) % 2 == 0, process.mean_on_s, process.mean_off_s)
        durations = rng.exponential(means)
        starts = np.concatenate(([0.0], np.cumsum(durations)[:-1]))
        if starts[-1] + durations[-1] >= end:
            break
        k *= 2
    keep = starts < end
    starts, durations = starts[keep], np.minimum(durations[keep], end - starts[keep])
    rates = np.where(np.arange(len(starts)) % 2 == 0, process.on_rps, process.off_rps)
    counts = rng.poisson(rates * durations)
    offsets = rng.uniform(0.0, 1.0, size=int(counts.sum())) * np.repeat(durations, counts)
    return np.sort(np.repeat(starts, counts) + offsets)


def _mean_rps(process: Arrivals) -> float:
    if isinstance(process, Poisson):
        return process.rate_rps
    return process.mean_rps


def arrival_times(process: Arrivals, rng: np.random.Generator, *, n: int | None = None,
                  duration_s: float | None = None) -> FloatArray:
    """The first `n` arrivals, or all arrivals before `duration_s` (exactly one of the two)."""
    if (n is None) == (duration_s is None):
        raise ValueError("give exactly one of n (requests) or duration_s")
    if (n is not None and n < 0) or (duration_s is not None and duration_s < 0):
        raise ValueError("n and duration_s must be >= 0")
    _check_process(process)
    if duration_s is not None:
        return _times_until(process, duration_s, rng)
    assert n is not None
    if isinstance(process, Poisson):
        return np.cumsum(rng.exponential(1.0 / process.rate_rps, size=n))
    horizon = 1.5 * n / _mean_rps(process) + 10.0
    while True:
        times = _times_until(process, horizon, rng)
        if len(times) >= n:
            return times[:n]
        horizon *= 2


def synthetic(process: Arrivals, prompt: LengthDist, output: LengthDist, *, n: int | None = None,
              duration_s: float | None = None, seed: int = 0, name: str | None = None) -> Workload:
    """A seeded synthetic workload: the same arguments and seed give the same requests."""
    rng = np.random.default_rng(seed)
    times = arrival_times(process, rng, n=n, duration_s=duration_s)
    count = len(times)
    return Workload(times, sample_lengths(prompt, count, rng), sample_lengths(output, count, rng),
                    name=name or type(process).__name__.lower())


# --- recorded traces ------------------------------------------------------------------------------
def from_rows(rows: Iterable[Mapping[str, Any]], name: str = "trace") -> Workload:
    """A workload from rows of the `requests` table (any order). Rows whose prompt or completion token
    count is unknown (NULL) or zero are left out and counted in `skipped_rows`: never read as 0."""
    kept: list[tuple[float, int, int]] = []
    skipped = 0
    for r in rows:
        p, c, t = r.get("prompt_tokens"), r.get("completion_tokens"), r.get("arrival_unix_s")
        if p is None or c is None or t is None or p < 1 or c < 1:
            skipped += 1
            continue
        kept.append((float(t), int(p), int(c)))
    kept.sort()
    if not kept:
        return Workload(np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64), name, skipped)
    arr = np.array(kept, dtype=np.float64)
    return Workload(arr[:, 0] - arr[0, 0], arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64), name, skipped)


def load_trace(store: Store, *, replica: str | None = None, since_unix_s: float | None = None,
               until_unix_s: float | None = None, limit: int = 1_000_000) -> Workload:
    """The requests the store recorded in [since, until) (one replica, or the whole fleet), as a workload."""
    rows = store.requests(since_unix_s=since_unix_s, until_unix_s=until_unix_s, replica=replica, limit=limit)
    return from_rows(rows, name=f"trace:{replica or 'fleet'}")
