"""The error_rate SLI from engine counters: successes and errors are deltas of engine_samples counters.

Counters are stored reset-adjusted (monotonic across engine restarts), so the events of a window are
the value at its end minus the value at its start, read from the latest usable sample before each
edge: two index lookups per replica, whatever the window length. Samples with NULL counters (failed
scrapes) are unknown gaps and are skipped; a counter keeps counting through a gap, so the delta across
it is still exact. If the stored series ever drops (e.g. the adjustment offset was lost when the plane
restarted), the window falls back to summing consecutive non-negative steps and leaves the dropping
step out (unknown), never reading it as zero or negative events.

The step across a window's start is credited whole when it is short (off by at most one scrape's events,
as documented for the series). A longer one spans a gap in the scrapes (an engine whose /metrics failed for
a while): only the share of it after the start counts, as if its events were spread evenly over it (as
Prometheus' rate() interpolates). Credited whole, the errors of the whole gap would land in the 5-minute
window of the first scrape after it, and page long after they stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

from controlplane.slo.evaluate import Counts
from controlplane.slo.rows import bucket_starts
from controlplane.store.models import EngineSample

_S = EngineSample
_USABLE = (_S.request_success_total.is_not(None), _S.request_errors_total.is_not(None))
# A step between two usable samples up to this long is credited whole to the window or bin of its later sample;
# a longer one (a gap in the scrapes) across a window's start is prorated. As cost's DEFAULT_MAX_GAP_S.
STEP_WHOLE_S = 60.0


def _sample(conn: Connection, replica_id: int, *where: Any, newest: bool) -> tuple[float, float, float] | None:
    order = _S.ts_unix_s.desc() if newest else _S.ts_unix_s.asc()
    row = conn.execute(select(_S.ts_unix_s, _S.request_success_total, _S.request_errors_total)
                       .where(_S.replica_id == replica_id, *_USABLE, *where).order_by(order).limit(1)).first()
    if row is None:
        return None
    ts, success, errors = row
    return float(ts), float(success or 0.0), float(errors or 0.0)  # never None: filtered by _USABLE


def _steps(conn: Connection, replica_id: int, lo: float, hi: float,
           start: float | None = None) -> tuple[Any, Any, Any]:
    """(timestamps, success steps, error steps) of consecutive usable samples with lo <= ts < hi, each step
    at its later sample's time; a step in which either counter dropped is left out. With `start`, a step longer
    than STEP_WHOLE_S across it keeps only its share after `start`."""
    rows = conn.execute(select(_S.ts_unix_s, _S.request_success_total, _S.request_errors_total)
                        .where(_S.replica_id == replica_id, *_USABLE, _S.ts_unix_s >= lo, _S.ts_unix_s < hi)
                        .order_by(_S.ts_unix_s)).all()
    a = np.array(rows, dtype=np.float64).reshape(len(rows), 3)
    ds, de = np.diff(a[:, 1]), np.diff(a[:, 2])
    if start is not None and len(a) > 1:
        t0, t1 = a[:-1, 0], a[1:, 0]
        across = (t0 < start) & (t1 > start) & (t1 - t0 > STEP_WHOLE_S)
        share = np.where(across, (t1 - start) / np.maximum(t1 - t0, 1e-9), 1.0)
        ds, de = ds * share, de * share
    ok = (ds >= 0) & (de >= 0)
    return a[1:, 0][ok], ds[ok], de[ok]


def error_counts(conn: Connection, replica_ids: Sequence[int], start: float, end: float) -> Counts:
    """Successes (good) and successes + errors (total) finished in [start, end), over the replicas."""
    good = total = 0.0
    for r in replica_ids:
        last = _sample(conn, r, _S.ts_unix_s < end, newest=True)
        if last is None:
            continue
        base = _sample(conn, r, _S.ts_unix_s < start, newest=True)
        inside = _sample(conn, r, _S.ts_unix_s >= start, _S.ts_unix_s < end, newest=False)
        first = base or inside
        if first is None:
            continue
        if base is not None and inside is not None and inside[0] - base[0] > STEP_WHOLE_S:
            # The step across the start spans a gap in the scrapes: only its share after the start counts.
            keep = 1.0 - (inside[0] - start) / (inside[0] - base[0])  # the share before the start
            first = (start, base[1] + keep * max(0.0, inside[1] - base[1]),
                     base[2] + keep * max(0.0, inside[2] - base[2]))
        ds, de = last[1] - first[1], last[2] - first[2]
        if ds < 0 or de < 0:
            _, s, e = _steps(conn, r, base[0] if base is not None else first[0], end, start=start)
            ds, de = float(s.sum()), float(e.sum())
        good += ds
        total += ds + de
    return Counts(good, total, method="counters")


def error_series(
    conn: Connection, replica_ids: Sequence[int], start: float, end: float, bin_s: int
) -> dict[int, Counts]:
    """Counts per bin (UTC-aligned multiples of bin_s). Each step between consecutive samples is
    credited to the bin of its later sample, so bins may be off by one scrape interval at their edges
    while their sum equals the window's events."""
    good: dict[int, float] = {}
    total: dict[int, float] = {}
    for r in replica_ids:
        base = _sample(conn, r, _S.ts_unix_s < start, newest=True)
        ts, s, e = _steps(conn, r, base[0] if base else start, end, start=start)
        keep = ts >= start
        ts, s, e = ts[keep], s[keep], e[keep]
        bins = bucket_starts(ts, bin_s)
        for b, si, ei in zip(bins.tolist(), s.tolist(), e.tolist(), strict=True):
            good[b] = good.get(b, 0.0) + si
            total[b] = total.get(b, 0.0) + si + ei
    return {b: Counts(good[b], total[b], method="counters") for b in good}
