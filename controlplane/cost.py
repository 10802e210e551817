"""Cost per token, pure: replica-hours from engine samples x price, tokens from counter deltas.

A replica counts as up between two consecutive scrapes that both succeeded and lie at most
`max_gap_s` apart. Its state is unknown between two scrapes of which one failed (it was watched and
did not answer: hung, crashed, unreachable) and across a longer silence between two samples (it was
there on both sides, and served, while nobody watched or stored it: the plane or the store was down).
Its hardware is billed all the while, so the cost of a step that holds such time is unknown, not the
cost of the time known up. Token counts are the increases of
the stored counters (reset-adjusted by the scraper, so monotonic across engine restarts), each spread
evenly over the time between its two readings, so tokens and up time are split between steps alike.
An interval whose counter drops (the adjustment offset was lost with a plane restart) or that spans
such a silence is unknown, never read as negative or zero tokens (as in `slo.counters`), and so are the
tokens of every step it overlaps: the step's cost bought tokens nobody counted.

A replica the plane launched is billed from its launch to its first sample as well: its hardware is held
while it loads the model, and it serves nothing then, so those seconds are up time with zero tokens (the
scraper only starts on a replica once it is ready, so without this start-up cost nothing, and each scale-up
read cheaper than it was).

Unknown stays unknown: no price gives null costs, a step without any counter reading gives null
tokens, and a step without tokens gives a null $/1M (never 0, never infinity). The store-facing
reads live in `controlplane.api.queries`; the Prometheus collector here takes them as a callable.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane import names

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

TOKENS_PER_MILLION: Final = 1_000_000.0
DEFAULT_MAX_GAP_S: Final = 60.0  # 12 default scrape intervals: longer silences are not counted as up time
WATCHED: Final = "watched"  # the group of replicas the plane only watches (no deployment spec)


def price_per_replica_hour(spec: Mapping[str, Any] | None) -> float | None:
    """hardware.price_per_hour_usd x hardware.count_per_replica of a stored Deployment document.

    A price of 0 is the spec's default, i.e. not configured: unknown (None), not free.
    """
    try:
        hw = (spec or {})["spec"]["hardware"]
        price, count = float(hw["price_per_hour_usd"]), float(hw["count_per_replica"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(price) and math.isfinite(count)) or price <= 0 or count <= 0:
        return None
    return price * count


def step_edges(since: float, until: float, step_s: float) -> FloatArray:
    """[since, b1, b2, ..., until]: steps aligned to UTC multiples of step_s, the first and last clipped."""
    if not since < until:
        raise ValueError(f"since ({since}) must be earlier than until ({until})")
    if not step_s > 0:
        raise ValueError(f"step_s must be positive, got {step_s}")
    first = math.floor(since / step_s) * step_s + step_s
    inner = np.arange(first, until, step_s, dtype=np.float64)
    return np.concatenate(([since], inner[inner > since], [until]))


def step_count(since: float, until: float, step_s: float) -> int:
    """How many steps `step_edges` would give (without building them), for bounding a request."""
    return max(1, math.ceil(until / step_s) - math.floor(since / step_s))


@dataclass(frozen=True)
class Samples:
    """One replica's engine samples, oldest first; NaN marks a counter that was not read (unknown)."""

    ts_unix_s: FloatArray
    scrape_ok: BoolArray
    prompt_tokens_total: FloatArray
    generation_tokens_total: FloatArray
    # (launch, end) of a launched replica's start-up: billed, serving nothing. It ends at the first sample,
    # or, without any, when the replica stopped or failed (inf while it still starts).
    starting: tuple[float, float] | None = None

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[float, bool, float | None, float | None]], *,
                  launched_unix_s: float | None = None, ended_unix_s: float | None = None) -> Samples:
        """From (ts_unix_s, scrape_ok, prompt_tokens_total, generation_tokens_total) rows, any order.
        `launched_unix_s`: when the plane launched the replica (None: one it only watches); `ended_unix_s`:
        when it stopped for good (None: it has not)."""
        rows = sorted(rows, key=lambda r: r[0])
        starting = None
        if launched_unix_s is not None:
            end = float(rows[0][0]) if rows else math.inf if ended_unix_s is None else float(ended_unix_s)
            starting = (float(launched_unix_s), end) if end > launched_unix_s else None
        return cls(
            np.array([float(r[0]) for r in rows], dtype=np.float64),
            np.array([bool(r[1]) for r in rows], dtype=np.bool_),
            np.array([np.nan if r[2] is None else float(r[2]) for r in rows], dtype=np.float64),
            np.array([np.nan if r[3] is None else float(r[3]) for r in rows], dtype=np.float64),
            starting,
        )


def starting_seconds(s: Samples, edges: FloatArray) -> FloatArray:
    """Seconds of each step inside the replica's start-up (see `Samples.starting`)."""
    if s.starting is None:
        return np.zeros(len(edges) - 1)
    lo, hi = s.starting
    out: FloatArray = np.maximum(0.0, np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo))
    return out


def up_seconds(s: Samples, edges: FloatArray, max_gap_s: float = DEFAULT_MAX_GAP_S) -> FloatArray:
    """Seconds the replica was up (billed) in each step [edges[i], edges[i+1]): between two successful
    scrapes, and during its start-up."""
    return _serving_seconds(s, edges, max_gap_s) + starting_seconds(s, edges)


def _serving_seconds(s: Samples, edges: FloatArray, max_gap_s: float) -> FloatArray:
    """Seconds between two successful scrapes at most `max_gap_s` apart, per step."""
    return _seconds_where(s, edges, max_gap_s, lambda ok0, ok1, silent: ok0 & ok1 & ~silent)


def unknown_seconds(s: Samples, edges: FloatArray, max_gap_s: float = DEFAULT_MAX_GAP_S) -> FloatArray:
    """Seconds in each step of unknown state: between two scrapes of which one failed, or across a
    silence longer than `max_gap_s` between two samples."""
    return _seconds_where(s, edges, max_gap_s, lambda ok0, ok1, silent: ~(ok0 & ok1) | silent)


def _seconds_where(s: Samples, edges: FloatArray, max_gap_s: float,
                   which: Callable[[BoolArray, BoolArray, BoolArray], BoolArray]) -> FloatArray:
    """Seconds per step inside the intervals between consecutive samples whose (first ok, second ok,
    longer than `max_gap_s`) pass `which`."""
    n = len(edges) - 1
    if len(s.ts_unix_s) < 2:
        return np.zeros(n)
    gaps = np.diff(s.ts_unix_s)
    counted = which(s.scrape_ok[:-1], s.scrape_ok[1:], gaps > max_gap_s)
    # Time accumulated since the first sample: rises inside counted intervals, flat elsewhere, so
    # linear interpolation at the step edges splits an interval between the steps it overlaps.
    cum = np.concatenate(([0.0], np.cumsum(np.where(counted, gaps, 0.0))))
    return np.diff(np.interp(edges, s.ts_unix_s, cum))


def _overlapping(lo: FloatArray, hi: FloatArray, edges: FloatArray) -> BoolArray:
    """Per step, whether any interval [lo[k], hi[k]] overlaps it (open at both ends)."""
    n = len(edges) - 1
    inside = (hi > edges[0]) & (lo < edges[-1]) & (hi > lo)
    first = np.clip(np.searchsorted(edges, lo[inside], side="right") - 1, 0, n - 1)
    last = np.clip(np.searchsorted(edges, hi[inside], side="left") - 1, 0, n - 1)
    marks = np.zeros(n + 1, dtype=np.int64)
    np.add.at(marks, first, 1)
    np.add.at(marks, last + 1, -1)
    return np.cumsum(marks[:-1]) > 0


def counter_increase(ts: FloatArray, values: FloatArray, edges: FloatArray,
                     max_gap_s: float = DEFAULT_MAX_GAP_S) -> tuple[FloatArray, BoolArray]:
    """(increase per step, known per step) of a stored counter; NaN readings are skipped.

    The increase between two readings is spread evenly over the time between them, so a step gets the
    part of it that falls inside (the same split as the up time). An interval whose counter drops or
    that is longer than `max_gap_s` is unusable and adds nothing; a step is known when a usable interval
    overlaps it and no unusable one does (part of what it served was not counted).
    """
    n = len(edges) - 1
    have = ~np.isnan(values)
    t, v = ts[have], values[have]
    if len(v) < 2:
        return np.zeros(n), np.zeros(n, dtype=np.bool_)
    delta = np.diff(v)
    kept = (delta >= 0) & (np.diff(t) <= max_gap_s)
    cum = np.concatenate(([0.0], np.cumsum(np.where(kept, delta, 0.0))))
    known = _overlapping(t[:-1][kept], t[1:][kept], edges) & ~_overlapping(t[:-1][~kept], t[1:][~kept], edges)
    return np.diff(np.interp(edges, t, cum)), known


@dataclass(frozen=True)
class Usage:
    """One deployment's replica-seconds and tokens per step; NaN tokens = unknown. `unknown_s`: replica
    seconds of unknown state (see `unknown_seconds`); a step with any has no known cost."""

    deployment: str
    price_per_replica_hour_usd: float | None
    edges: FloatArray
    up_s: FloatArray
    prompt_tokens: FloatArray
    completion_tokens: FloatArray
    unknown_s: FloatArray


def usage(deployment: str, price: float | None, replicas: Sequence[Samples], edges: FloatArray,
          max_gap_s: float = DEFAULT_MAX_GAP_S) -> Usage:
    """Sum the replicas of a deployment step by step. A step's tokens are known when some replica's are
    and no replica that served in it (whose time is billed) has unknown tokens there: its tokens are
    part of what the step's cost bought, so leaving them out would overstate the $/1M. A replica
    starting up in a step served none there, a known zero."""
    n = len(edges) - 1
    up, unknown = np.zeros(n), np.zeros(n)
    tokens = {"p": (np.zeros(n), np.zeros(n, dtype=np.bool_)), "g": (np.zeros(n), np.zeros(n, dtype=np.bool_))}
    missing = {"p": np.zeros(n, dtype=np.bool_), "g": np.zeros(n, dtype=np.bool_)}
    for s in replicas:
        serving, starting = _serving_seconds(s, edges, max_gap_s), starting_seconds(s, edges)
        up += serving + starting
        unknown += unknown_seconds(s, edges, max_gap_s)
        for key, series in (("p", s.prompt_tokens_total), ("g", s.generation_tokens_total)):
            inc, known = counter_increase(s.ts_unix_s, series, edges, max_gap_s)
            acc, acc_known = tokens[key]
            tokens[key] = (acc + inc, acc_known | known | (starting > 0))
            missing[key] |= (serving > 0) & ~known
    (p, pk), (g, gk) = tokens["p"], tokens["g"]
    return Usage(deployment, price, edges, up, np.where(pk & ~missing["p"], p, np.nan),
                 np.where(gk & ~missing["g"], g, np.nan), unknown)


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def per_million(usd: float | None, tokens: float | None) -> float | None:
    """$ per 1M tokens; None when the cost or the tokens are unknown, or there were no tokens. Tokens
    without any measured up time (their readings straddle failed scrapes) have no known cost either."""
    if usd is None or tokens is None or not tokens > 0 or not usd > 0:  # NaN: unknown
        return None
    return usd / tokens * TOKENS_PER_MILLION


@dataclass(frozen=True)
class CostPoint:
    ts_unix_s: float
    replicas_up: float  # mean replicas known up over the step
    replicas_unknown: float  # mean replicas of unknown state (failed scrapes) over the step
    usd_per_hour: float | None
    prompt_tokens: float | None
    completion_tokens: float | None
    usd_per_1m_prompt_tokens: float | None
    usd_per_1m_completion_tokens: float | None
    usd_per_1m_tokens: float | None


@dataclass(frozen=True)
class CostTotals:
    replica_hours: float
    unknown_replica_hours: float
    usd: float | None
    prompt_tokens: float | None
    completion_tokens: float | None
    usd_per_1m_tokens: float | None


def points(u: Usage) -> list[CostPoint]:
    """Each step's cost. The full cost of a step is set against each token kind in turn for the
    per-kind figures ($/1M prompt tokens as if only prompt tokens were bought), and against both."""
    out = []
    price = u.price_per_replica_hour_usd
    for i in range(len(u.up_s)):
        lo, hi = float(u.edges[i]), float(u.edges[i + 1])
        up_s = float(u.up_s[i])
        usd = None if price is None or u.unknown_s[i] > 0 else up_s / 3600.0 * price
        p, g = _opt(float(u.prompt_tokens[i])), _opt(float(u.completion_tokens[i]))
        replicas_up = up_s / (hi - lo)
        out.append(CostPoint(
            ts_unix_s=lo, replicas_up=replicas_up, replicas_unknown=float(u.unknown_s[i]) / (hi - lo),
            usd_per_hour=None if usd is None else usd / ((hi - lo) / 3600.0),
            prompt_tokens=p, completion_tokens=g, usd_per_1m_prompt_tokens=per_million(usd, p),
            usd_per_1m_completion_tokens=per_million(usd, g),
            usd_per_1m_tokens=None if p is None or g is None else per_million(usd, p + g),
        ))
    return out


def totals(u: Usage) -> CostTotals:
    """The window's sums. Its $/1M sets the cost of the steps whose tokens of both kinds and whose cost
    are known against those tokens only: the cost of a step with unknown tokens bought tokens nobody
    counted. The window's cost is unknown when any replica's state was unknown in it."""
    price = u.price_per_replica_hour_usd
    replica_hours = float(u.up_s.sum()) / 3600.0
    unknown_hours = float(u.unknown_s.sum()) / 3600.0
    usd = None if price is None or unknown_hours > 0 else replica_hours * price
    p = _opt(float(np.nansum(u.prompt_tokens))) if np.any(~np.isnan(u.prompt_tokens)) else None
    g = _opt(float(np.nansum(u.completion_tokens))) if np.any(~np.isnan(u.completion_tokens)) else None
    both = ~np.isnan(u.prompt_tokens) & ~np.isnan(u.completion_tokens) & ~(u.unknown_s > 0)
    usd_counted = None if price is None else float(u.up_s[both].sum()) / 3600.0 * price
    counted = float((u.prompt_tokens[both] + u.completion_tokens[both]).sum()) if both.any() else None
    return CostTotals(replica_hours, unknown_hours, usd, p, g, per_million(usd_counted, counted))


def cost_json(u: Usage) -> dict[str, Any]:
    """The REST view of one deployment's cost (see the contract of /api/v1/cost)."""
    t = totals(u)
    return {
        "deployment": u.deployment, "price_per_replica_hour_usd": u.price_per_replica_hour_usd,
        "points": [vars(p) for p in points(u)],
        "totals": {"replica_hours": t.replica_hours, "unknown_replica_hours": t.unknown_replica_hours, "usd": t.usd,
                   "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                   "usd_per_1m_tokens": t.usd_per_1m_tokens},
    }


UsageSource = Callable[[FloatArray], Sequence[Usage]]
"""(step edges) -> every deployment's usage over them; `api.queries.cost_source` reads it from the store."""


class CostCollector(Collector):
    """$/1M tokens and $/hour per deployment over the last `window_s`, computed at scrape time.

    A deployment whose figure is unknown (no price, no tokens, no readings) gets no series at all, so a
    `> budget` alert stays silent instead of seeing a zero; a failed read is logged and yields nothing.
    """

    def __init__(self, source: UsageSource, *, window_s: float, lag_s: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if not lag_s >= 0:
            raise ValueError(f"lag_s must be >= 0, got {lag_s}")
        self.source = source
        self.window_s = window_s
        # The window ends this long before now: the time since a replica's last scrape is not known up yet, so a
        # window ending now counted up to one scrape interval of it as not up ($/hour ~1.7 % low at 5 s / 300 s).
        self.lag_s = lag_s
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        end = self.clock() - self.lag_s
        edges = np.array([end - self.window_s, end], dtype=np.float64)
        try:
            usages = list(self.source(edges))
        except Exception:  # noqa: BLE001 - a failed cost read must not break the plane's /metrics
            log.exception("cost per token: reading usage failed")
            return
        per_mtok = GaugeMetricFamily(names.PLANE_COST_PER_MTOK,
                                     f"USD per million tokens (prompt + completion) over the last {self.window_s:g}s",
                                     labels=[names.LABEL_DEPLOYMENT])
        per_hour = GaugeMetricFamily(names.PLANE_COST_USD_PER_HOUR,
                                     f"USD per hour of the replicas up over the last {self.window_s:g}s",
                                     labels=[names.LABEL_DEPLOYMENT])
        for u in usages:
            t = totals(u)
            if t.usd_per_1m_tokens is not None:
                per_mtok.add_metric([u.deployment], t.usd_per_1m_tokens)
            if t.usd is not None:
                per_hour.add_metric([u.deployment], t.usd / (self.window_s / 3600.0))
        yield from (f for f in (per_mtok, per_hour) if f.samples)


# --- cost per tenant ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TenantTokens:
    """The stored requests of one tenant on one replica in one step (vLLM's spans joined to the router's
    by trace id). `replica` None: a request span from no known replica; `tenant` None: no tenant."""

    replica: int | None
    step: int
    tenant: str | None
    requests: int
    prompt_tokens: float
    completion_tokens: float


@dataclass(frozen=True)
class TenantUsage:
    """One tenant's requests, tokens and allocated cost per step; NaN cost = unknown."""

    tenant: str | None
    requests: npt.NDArray[np.int64]
    prompt_tokens: FloatArray
    completion_tokens: FloatArray
    usd: FloatArray


@dataclass(frozen=True)
class TenantCosts:
    edges: FloatArray
    tenants: list[TenantUsage]
    unallocated_usd: FloatArray  # replica time in steps where the replica served no request tokens; NaN unknown


def replica_usd(up_s: FloatArray, price: float | None, unknown_s: FloatArray | None = None) -> FloatArray:
    """A replica's cost per step: unknown (NaN) without a price, unless it was not up at all (then 0),
    and unknown in a step where its state was unknown for some time (see `unknown_seconds`)."""
    usd = np.where(up_s > 0, np.nan, 0.0) if price is None else up_s / 3600.0 * price
    return usd if unknown_s is None else np.where(unknown_s > 0, np.nan, usd)


def seen_near(s: Samples, edges: FloatArray, max_gap_s: float = DEFAULT_MAX_GAP_S) -> BoolArray:
    """Per step, whether the replica had a successful scrape within `max_gap_s` of it: whether it was watched
    then (its last interval before a step edge, or the step it was removed in, are still seen)."""
    ok = s.ts_unix_s[s.scrape_ok]
    lo = np.searchsorted(ok, edges[:-1] - max_gap_s, side="left")
    hi = np.searchsorted(ok, edges[1:] + max_gap_s, side="right")
    out: BoolArray = hi > lo
    return out


def tenant_costs(edges: FloatArray, replica_cost: Mapping[int, FloatArray],
                 rows: Iterable[TenantTokens], seen: Mapping[int, BoolArray] | None = None) -> TenantCosts:
    """Split each replica's cost in each step between the tenants whose requests it served then.

    The allocation rule: a tenant's share of a replica's cost in a step is its share of the tokens
    (prompt + completion, from the request spans) that replica processed in that step. One token of
    either kind weighs the same: the engine's counters give no split of a step's cost by kind either,
    so the per-kind $/1M figures below, as the deployment ones, set the tenant's whole cost against
    each kind. Requests without a tenant form the tenant None; a replica-step with no request tokens
    (idle, or its spans not stored) goes to `unallocated_usd`, so tenants + unallocated = the fleet's
    cost. A replica that served in a step without up time there costs nothing in it, unless `seen` says it
    was not watched anywhere near the step (a watched replica before its first scrape): unknown then. A
    share of an unknown cost (no price, or no known replica) is unknown, and so is every tenant's share of
    a replica-step that served a request of unknown token count (NaN tokens): its weight is unknown, so
    charging the others its part would overstate theirs.
    """
    n = len(edges) - 1
    rows = [r for r in rows if 0 <= r.step < n]
    weight: dict[tuple[int | None, int], float] = {}
    for r in rows:
        key = (r.replica, r.step)
        weight[key] = weight.get(key, 0.0) + r.prompt_tokens + r.completion_tokens
    by_tenant: dict[str | None, TenantUsage] = {}
    for r in rows:
        t = by_tenant.get(r.tenant)
        if t is None:
            t = by_tenant[r.tenant] = TenantUsage(r.tenant, np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n),
                                                  np.zeros(n))
        t.requests[r.step] += r.requests
        t.prompt_tokens[r.step] += r.prompt_tokens
        t.completion_tokens[r.step] += r.completion_tokens
        tokens, total = r.prompt_tokens + r.completion_tokens, weight[(r.replica, r.step)]
        if tokens > 0 or math.isnan(total):
            usd = replica_cost.get(r.replica) if r.replica is not None else None
            step_cost = usd[r.step] if usd is not None else np.nan
            if step_cost == 0:  # served in a step without up time (requests are stepped by arrival)
                watched = seen is None or (r.replica is not None and r.replica in seen
                                           and bool(seen[r.replica][r.step]))
                step_cost = 0.0 if watched else np.nan  # not watched near it: it ran unobserved, cost unknown
            if step_cost != 0:
                t.usd[r.step] += tokens / total * step_cost
    served = {rid: np.zeros(n, dtype=np.bool_) for rid in replica_cost}
    for (rid, i), w in weight.items():
        if rid in served and not w <= 0:  # NaN: served tokens of unknown count
            served[rid][i] = True
    unallocated = np.zeros(n)
    for rid, usd in replica_cost.items():
        unallocated += np.where(served[rid], 0.0, usd)
    ordered = sorted(by_tenant.values(), key=lambda t: (t.tenant is None, t.tenant or ""))
    return TenantCosts(edges, ordered, unallocated)


def _tenant_figures(requests: int, prompt: float, completion: float, usd: float | None) -> dict[str, Any]:
    return {"requests": requests, "prompt_tokens": _opt(prompt), "completion_tokens": _opt(completion), "usd": usd,
            "usd_per_1m_prompt_tokens": per_million(usd, prompt),
            "usd_per_1m_completion_tokens": per_million(usd, completion),
            "usd_per_1m_tokens": per_million(usd, prompt + completion)}


def tenant_cost_json(c: TenantCosts) -> dict[str, Any]:
    """The REST view of cost per tenant (see the contract of /api/v1/cost/tenants)."""
    starts = [float(x) for x in c.edges[:-1]]
    items = []
    for t in c.tenants:
        pts = [{"ts_unix_s": ts, **_tenant_figures(int(t.requests[i]), float(t.prompt_tokens[i]),
                                                    float(t.completion_tokens[i]), _opt(float(t.usd[i])))}
               for i, ts in enumerate(starts)]
        usd = None if np.isnan(t.usd).any() else float(t.usd.sum())
        items.append({"tenant": t.tenant, "points": pts,
                      "totals": _tenant_figures(int(t.requests.sum()), float(t.prompt_tokens.sum()),
                                                float(t.completion_tokens.sum()), usd)})
    un = c.unallocated_usd
    return {"items": items, "unallocated": {
        "points": [{"ts_unix_s": ts, "usd": _opt(float(un[i]))} for i, ts in enumerate(starts)],
        "usd": None if np.isnan(un).any() else float(un.sum())}}
